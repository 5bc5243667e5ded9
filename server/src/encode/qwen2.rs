//! Qwen2 (gte-Qwen2-*-instruct and other Qwen2-based embedders) on the Qwen decoder body of
//! [`super::qwen3`]: Qwen3's layers without the per-head query and key norms, with biases on
//! the query, key and value projections (always: transformers hard-codes them), and, with
//! `use_sliding_window`, a causal sliding window on the layers from `max_window_layers` on (or
//! as `layer_types` lists them). Read as transformers 5.23's `Qwen2Config` reads the file,
//! its defaults for absent keys.
use serde::Deserialize;
use serde_json::Value;

use super::qwen3::{QwenSpec, check_attention_keys, rope_theta};

/// transformers' Qwen2Config, with its defaults for absent keys.
#[derive(Debug, Clone, Deserialize)]
pub struct Qwen2Config {
    #[serde(default = "d151936")]
    pub vocab_size: usize,
    #[serde(default = "d4096")]
    pub hidden_size: usize,
    #[serde(default = "d22016")]
    pub intermediate_size: usize,
    #[serde(default = "d32")]
    pub num_hidden_layers: usize,
    #[serde(default = "d32")]
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Not a Qwen2Config key, but the attention reads it when a config carries it.
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "silu")]
    pub hidden_act: String,
    #[serde(default = "d32768")]
    pub max_position_embeddings: usize,
    #[serde(default = "eps6")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    #[serde(default)]
    pub use_sliding_window: bool,
    /// Absent: 4096; `null`: no window.
    #[serde(default = "some4096")]
    pub sliding_window: Option<usize>,
    #[serde(default = "d28")]
    pub max_window_layers: usize,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default)]
    pub is_causal: Option<bool>,
}

fn d151936() -> usize {
    151_936
}
fn d4096() -> usize {
    4096
}
fn some4096() -> Option<usize> {
    Some(4096)
}
fn d22016() -> usize {
    22_016
}
fn d32() -> usize {
    32
}
fn d28() -> usize {
    28
}
fn d32768() -> usize {
    32_768
}
fn eps6() -> f64 {
    1e-6
}
fn silu() -> String {
    "silu".into()
}

impl Qwen2Config {
    /// What the body computes, or what cannot run here, named by key.
    pub fn spec(&self) -> Result<QwenSpec, String> {
        if self.hidden_act != "silu" {
            return Err(format!("config.json hidden_act: {:?} is not supported (silu)", self.hidden_act));
        }
        let layers = self.num_hidden_layers;
        // Qwen2Config.__post_init__: the window counts only under use_sliding_window; without
        // layer_types, layers from max_window_layers on slide.
        let window = if self.use_sliding_window { self.sliding_window } else { None };
        check_attention_keys(self.is_causal, self.layer_types.as_deref(), layers, window.is_some())?;
        let sliding: Vec<bool> = match &self.layer_types {
            Some(types) => types.iter().map(|t| t == "sliding_attention").collect(),
            None => (0..layers).map(|i| window.is_some() && i >= self.max_window_layers).collect(),
        };
        // transformers' sliding mask keeps key k for query q when q - window < k <= q: the
        // token and the window - 1 before it.
        let before = match window {
            Some(0) if sliding.contains(&true) => return Err("config.json sliding_window: 0 leaves a token nothing to attend to".into()),
            Some(w) => Some(w.saturating_sub(1)),
            None => None,
        };
        let heads = self.num_attention_heads;
        if heads == 0 {
            return Err("config.json num_attention_heads: 0".into());
        }
        Ok(QwenSpec {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_attention_heads: heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(heads),
            head_dim: self.head_dim.unwrap_or(self.hidden_size / heads),
            max_position_embeddings: self.max_position_embeddings,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: rope_theta(self.rope_parameters.as_ref(), self.rope_scaling.as_ref(), self.rope_theta)?,
            qkv_bias: true,
            o_bias: false,
            head_norms: false,
            windows: sliding.into_iter().map(|s| if s { before } else { None }).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(extra: &str) -> Result<QwenSpec, String> {
        let json = format!(r#"{{"vocab_size": 10, "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 4, "num_attention_heads": 2{extra}}}"#);
        serde_json::from_str::<Qwen2Config>(&json).unwrap().spec()
    }

    #[test]
    fn windows_follow_use_sliding_window_as_transformers_reads_them() {
        // No window unless use_sliding_window, whatever sliding_window says (gte-Qwen2's 131072).
        assert_eq!(spec(r#", "sliding_window": 131072, "max_window_layers": 1"#).unwrap().windows, [None; 4]);
        // Layers from max_window_layers on, each token with the sliding_window - 1 before it.
        let on = spec(r#", "use_sliding_window": true, "sliding_window": 8, "max_window_layers": 2"#).unwrap();
        assert_eq!(on.windows, [None, None, Some(7), Some(7)]);
        // The default window (4096) and max_window_layers (28): no layer of 4 slides.
        assert_eq!(spec(r#", "use_sliding_window": true"#).unwrap().windows, [None; 4]);
        // `null` window: nothing slides.
        assert_eq!(spec(r#", "use_sliding_window": true, "sliding_window": null, "max_window_layers": 0"#).unwrap().windows, [None; 4]);
        // layer_types wins over max_window_layers.
        let types = r#", "use_sliding_window": true, "sliding_window": 3, "layer_types": ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]"#;
        assert_eq!(spec(types).unwrap().windows, [Some(2), None, None, Some(2)]);
        // Defaults: head_dim from hidden / heads, rope 10000, biases on q/k/v only.
        let plain = spec("").unwrap();
        assert_eq!((plain.head_dim, plain.rope_theta, plain.qkv_bias, plain.o_bias, plain.head_norms), (4, 10_000.0, true, false, false));
        assert_eq!(spec(r#", "rope_theta": 1000000.0"#).unwrap().rope_theta, 1e6);
    }

    #[test]
    fn what_cannot_run_is_named() {
        let cases = [
            (r#", "is_causal": false"#, "is_causal: false"),
            (r#", "hidden_act": "gelu""#, "hidden_act: \"gelu\""),
            (r#", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}"#, "rope_scaling.rope_type: \"yarn\""),
            (r#", "layer_types": ["full_attention", "sliding_attention", "full_attention", "full_attention"]"#, "layer 1 is \"sliding_attention\" without a sliding window"),
            (r#", "layer_types": ["full_attention"]"#, "1 entries for 4 layers"),
            (r#", "use_sliding_window": true, "sliding_window": 0, "max_window_layers": 0"#, "sliding_window: 0"),
        ];
        for (extra, needle) in cases {
            let err = spec(extra).unwrap_err();
            assert!(err.contains(needle), "{extra}: {err}");
        }
    }
}
