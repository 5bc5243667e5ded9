//! Service configuration: one struct, loaded once (built-in defaults, then a TOML file,
//! then `HARDNEG__SECTION__KEY` environment variables, then command-line flags).
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The `[index]` section, defined with the index that uses it.
pub use crate::index::IndexConfig;

/// The documented defaults; also the base layer of every load, so code and docs cannot drift.
pub const DEFAULT_TOML: &str = include_str!("../../config/hardneg.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub encoder: EncoderConfig,
    pub reranker: RerankerConfig,
    pub index: IndexConfig,
    pub mining: MiningConfig,
    pub limits: LimitsConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: String,
    /// Empty: no metrics endpoint.
    pub metrics_listen: String,
    /// Empty: the token comes from HARDNEG_AUTH_TOKEN, or there is none.
    pub auth_token_file: PathBuf,
    pub data_dir: PathBuf,
    /// The store's page cache, MiB.
    pub store_cache_mb: usize,
    pub shutdown_grace_seconds: f64,
    pub shutdown_timeout_seconds: f64,
    /// PEM certificate chain and private key for TLS on the gRPC port; both empty: plaintext.
    pub tls_cert_file: PathBuf,
    pub tls_key_file: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncoderConfig {
    pub model_dir: PathBuf,
    /// 0: from the model's own files.
    pub max_tokens: usize,
    pub token_budget: usize,
    pub max_batch_texts: usize,
    pub queue_capacity: usize,
    /// Re-encode refreshes load checkpoints from under this directory only.
    pub models_root: PathBuf,
    /// `cpu` or `cuda:N` (see [`EncoderConfig::device_spec`]).
    pub device: String,
    /// `f32`, `f16` or `bf16` (see [`EncoderConfig::dtype_spec`]).
    pub dtype: String,
    /// CPU kernels for the whole process (see [`crate::encode::cpu`]).
    pub cpu_kernels: String,
    /// The BLAS library to open; empty searches [`crate::encode::cpu::SEARCHED`].
    pub blas_library: String,
}

impl EncoderConfig {
    pub fn cpu_kernels_spec(&self) -> KernelsSpec {
        KernelsSpec::parse(&self.cpu_kernels).expect("validated at load")
    }

    pub fn device_spec(&self) -> DeviceSpec {
        parse_device(&self.device).expect("validated at load")
    }
    pub fn dtype_spec(&self) -> DTypeSpec {
        parse_dtype(&self.dtype).expect("validated at load")
    }
}

impl RerankerConfig {
    pub fn device_spec(&self) -> DeviceSpec {
        parse_device(&self.device).expect("validated at load")
    }
    pub fn dtype_spec(&self) -> DTypeSpec {
        parse_dtype(&self.dtype).expect("validated at load")
    }
}

/// `encoder.cpu_kernels`: how f32 models run on the CPU (see `crate::encode::cpu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelsSpec {
    Auto,
    Blas,
    Fused,
    Candle,
}

impl KernelsSpec {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "blas" => Ok(Self::Blas),
            "fused" => Ok(Self::Fused),
            "candle" => Ok(Self::Candle),
            other => Err(format!("unknown CPU kernels {other:?}: expected \"auto\", \"blas\", \"fused\" or \"candle\"")),
        }
    }
}

/// Where a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    /// CUDA device ordinal; needs a build with the `cuda` feature.
    Cuda(usize),
}

/// The dtype a model's weights and activations use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DTypeSpec {
    F32,
    F16,
    Bf16,
}

/// `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
pub fn parse_device(s: &str) -> Result<DeviceSpec, String> {
    match s.trim() {
        "cpu" => Ok(DeviceSpec::Cpu),
        "cuda" => Ok(DeviceSpec::Cuda(0)),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .map(DeviceSpec::Cuda)
            .ok_or_else(|| format!("{s:?} is not a device: use \"cpu\" or \"cuda:N\"")),
    }
}

/// `f32`, `f16` or `bf16`.
pub fn parse_dtype(s: &str) -> Result<DTypeSpec, String> {
    match s.trim() {
        "f32" => Ok(DTypeSpec::F32),
        "f16" => Ok(DTypeSpec::F16),
        "bf16" => Ok(DTypeSpec::Bf16),
        _ => Err(format!("{s:?} is not a dtype: use \"f32\", \"f16\" or \"bf16\"")),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RerankerConfig {
    /// Empty: no cross-encoder.
    pub model_dir: PathBuf,
    /// 0: the model's max_position_embeddings, at most 512.
    pub max_tokens: usize,
    pub token_budget: usize,
    pub max_batch_texts: usize,
    pub queue_capacity: usize,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// `f32`, `f16` or `bf16`.
    pub dtype: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MiningConfig {
    pub default_range_max: u32,
    pub max_depth: u32,
    pub default_temperature: f32,
    pub min_generation_wait_seconds: f64,
    /// SimANS sampling's a when a request leaves it unset.
    #[serde(default = "default_simans_a")]
    pub simans_a: f32,
    /// SimANS sampling's b when a request leaves it unset.
    #[serde(default = "default_simans_b")]
    pub simans_b: f32,
}

fn default_max_metadata_entries() -> usize {
    64
}

fn default_max_metadata_bytes() -> usize {
    16 * 1024
}

fn default_simans_a() -> f32 {
    20.0
}

fn default_simans_b() -> f32 {
    -0.05
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_batch_queries: usize,
    pub max_num_negatives: u32,
    pub max_range: u32,
    pub max_text_chars: usize,
    pub max_rerank_candidates: u32,
    pub max_rerank_pairs: usize,
    pub max_positives_per_query: usize,
    pub max_docs_per_message: usize,
    /// Metadata entries per document.
    #[serde(default = "default_max_metadata_entries")]
    pub max_metadata_entries: usize,
    /// Metadata bytes (keys and values) per document.
    #[serde(default = "default_max_metadata_bytes")]
    pub max_metadata_bytes: usize,
    pub max_message_bytes: usize,
    pub max_in_flight: usize,
    pub max_streams: usize,
    pub mine_timeout_seconds: f64,
}

/// Values given on the command line; they win over every other source.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub metrics_listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub model_dir: Option<PathBuf>,
    pub reranker_dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration: {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl Config {
    /// Loads defaults, then `file` (when given), then the process environment, then `overrides`.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        Self::load_with_env(file, overrides, None)
    }

    /// As [`Config::load`], with the environment given explicitly (tests); `None` reads the
    /// process environment.
    pub fn load_with_env(
        file: Option<&Path>,
        overrides: &Overrides,
        env: Option<std::collections::HashMap<String, String>>,
    ) -> Result<Self, ConfigError> {
        use config::{Environment, File, FileFormat};
        let mut builder =
            config::Config::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
        if let Some(path) = file {
            builder = builder.add_source(File::from(path).format(FileFormat::Toml).required(true));
        }
        let mut environment = Environment::with_prefix("HARDNEG")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true);
        if let Some(env) = env {
            environment = environment.source(Some(env));
        }
        builder = builder.add_source(environment);
        if let Some(listen) = &overrides.listen {
            builder = builder.set_override("server.listen", listen.as_str())?;
        }
        if let Some(addr) = &overrides.metrics_listen {
            builder = builder.set_override("server.metrics_listen", addr.as_str())?;
        }
        if let Some(dir) = &overrides.data_dir {
            builder = builder.set_override("server.data_dir", dir.to_string_lossy().as_ref())?;
        }
        if let Some(dir) = &overrides.model_dir {
            builder = builder.set_override("encoder.model_dir", dir.to_string_lossy().as_ref())?;
        }
        if let Some(dir) = &overrides.reranker_dir {
            builder = builder.set_override("reranker.model_dir", dir.to_string_lossy().as_ref())?;
        }
        let cfg: Config = builder.build()?.try_deserialize()?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("encoder.token_budget", self.encoder.token_budget),
            ("encoder.max_batch_texts", self.encoder.max_batch_texts),
            ("encoder.queue_capacity", self.encoder.queue_capacity),
            ("reranker.token_budget", self.reranker.token_budget),
            ("reranker.max_batch_texts", self.reranker.max_batch_texts),
            ("reranker.queue_capacity", self.reranker.queue_capacity),
            ("limits.max_rerank_candidates", self.limits.max_rerank_candidates as usize),
            ("limits.max_rerank_pairs", self.limits.max_rerank_pairs),
            ("index.threads", self.index.threads),
            ("index.connectivity", self.index.connectivity),
            ("limits.max_batch_queries", self.limits.max_batch_queries),
            ("limits.max_text_chars", self.limits.max_text_chars),
            ("limits.max_docs_per_message", self.limits.max_docs_per_message),
            ("limits.max_metadata_entries", self.limits.max_metadata_entries),
            ("limits.max_metadata_bytes", self.limits.max_metadata_bytes),
            ("limits.max_message_bytes", self.limits.max_message_bytes),
            ("limits.max_in_flight", self.limits.max_in_flight),
            ("limits.max_streams", self.limits.max_streams),
            ("limits.max_num_negatives", self.limits.max_num_negatives as usize),
            ("mining.default_range_max", self.mining.default_range_max as usize),
            ("server.store_cache_mb", self.server.store_cache_mb),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(ConfigError::Invalid { field, reason: "must be greater than 0".into() });
            }
        }
        if self.mining.max_depth < self.mining.default_range_max {
            return Err(ConfigError::Invalid {
                field: "mining.max_depth",
                reason: "must be at least mining.default_range_max".into(),
            });
        }
        if !(self.mining.simans_a > 0.0 && self.mining.simans_a.is_finite()) {
            return Err(ConfigError::Invalid { field: "mining.simans_a", reason: "must be a finite number above 0".into() });
        }
        if !self.mining.simans_b.is_finite() {
            return Err(ConfigError::Invalid { field: "mining.simans_b", reason: "must be finite".into() });
        }
        if !(self.mining.default_temperature > 0.0) {
            return Err(ConfigError::Invalid {
                field: "mining.default_temperature",
                reason: "must be greater than 0".into(),
            });
        }
        if !(self.limits.mine_timeout_seconds > 0.0 && self.limits.mine_timeout_seconds.is_finite()) {
            return Err(ConfigError::Invalid { field: "limits.mine_timeout_seconds", reason: "must be a finite number of seconds above 0".into() });
        }
        for (field, value) in [
            ("server.shutdown_grace_seconds", self.server.shutdown_grace_seconds),
            ("server.shutdown_timeout_seconds", self.server.shutdown_timeout_seconds),
            ("index.save_interval_seconds", self.index.save_interval_seconds),
        ] {
            if !(value >= 0.0 && value.is_finite()) {
                return Err(ConfigError::Invalid { field, reason: "must be a finite number of seconds, 0 or more".into() });
            }
        }
        if self.server.shutdown_timeout_seconds < self.server.shutdown_grace_seconds {
            return Err(ConfigError::Invalid {
                field: "server.shutdown_timeout_seconds",
                reason: "must be at least server.shutdown_grace_seconds".into(),
            });
        }
        if !(self.mining.min_generation_wait_seconds >= 0.0 && self.mining.min_generation_wait_seconds.is_finite()) {
            return Err(ConfigError::Invalid {
                field: "mining.min_generation_wait_seconds",
                reason: "must be a finite number of seconds, 0 or more".into(),
            });
        }
        if !self.server.metrics_listen.is_empty() && self.server.metrics_listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::Invalid {
                field: "server.metrics_listen",
                reason: format!("{:?} is not an ADDR:PORT socket address (or empty to turn metrics off)", self.server.metrics_listen),
            });
        }
        for (field, value) in [("encoder.device", &self.encoder.device), ("reranker.device", &self.reranker.device)] {
            parse_device(value).map_err(|reason| ConfigError::Invalid { field, reason })?;
        }
        for (field, value) in [("encoder.dtype", &self.encoder.dtype), ("reranker.dtype", &self.reranker.dtype)] {
            parse_dtype(value).map_err(|reason| ConfigError::Invalid { field, reason })?;
        }
        KernelsSpec::parse(&self.encoder.cpu_kernels).map_err(|reason| ConfigError::Invalid { field: "encoder.cpu_kernels", reason })?;
        if self.server.tls_cert_file.as_os_str().is_empty() != self.server.tls_key_file.as_os_str().is_empty() {
            let field = if self.server.tls_cert_file.as_os_str().is_empty() { "server.tls_cert_file" } else { "server.tls_key_file" };
            return Err(ConfigError::Invalid { field, reason: "TLS needs both server.tls_cert_file and server.tls_key_file (or neither)".into() });
        }
        if self.server.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::Invalid {
                field: "server.listen",
                reason: format!("{:?} is not an ADDR:PORT socket address", self.server.listen),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn no_env() -> Option<HashMap<String, String>> {
        Some(HashMap::new())
    }

    #[test]
    fn defaults_parse_and_match_the_documented_file() {
        let cfg = Config::load_with_env(None, &Overrides::default(), no_env()).unwrap();
        assert_eq!(cfg.server.listen, "127.0.0.1:50051");
        assert_eq!(cfg.encoder.model_dir, PathBuf::from("models/all-MiniLM-L6-v2"));
        assert_eq!(cfg.mining.default_range_max, 30);
        assert_eq!(cfg.limits.max_num_negatives, 256);
        assert_eq!(cfg.reranker.model_dir, PathBuf::new(), "no cross-encoder by default");
    }

    #[test]
    fn file_then_env_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[server]\nlisten = \"127.0.0.1:6000\"\n[mining]\nmax_depth = 500\n[limits]\nmax_batch_queries = 7\n").unwrap();
        let env = HashMap::from([
            ("HARDNEG__MINING__MAX_DEPTH".to_string(), "800".to_string()),
            ("HARDNEG__SERVER__LISTEN".to_string(), "127.0.0.1:6001".to_string()),
        ]);
        let cfg = Config::load_with_env(Some(&file), &Overrides::default(), Some(env.clone())).unwrap();
        assert_eq!(cfg.limits.max_batch_queries, 7, "file applies");
        assert_eq!(cfg.mining.max_depth, 800, "env beats file");
        assert_eq!(cfg.server.listen, "127.0.0.1:6001");
        let flags = Overrides {
            listen: Some("127.0.0.1:7000".into()),
            data_dir: Some("/tmp/x".into()),
            model_dir: Some("/m".into()),
            reranker_dir: Some("/r".into()),
            metrics_listen: Some("127.0.0.1:7001".into()),
        };
        let cfg = Config::load_with_env(Some(&file), &flags, Some(env)).unwrap();
        assert_eq!(cfg.server.listen, "127.0.0.1:7000", "flags beat env");
        assert_eq!(cfg.server.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(cfg.encoder.model_dir, PathBuf::from("/m"));
        assert_eq!(cfg.reranker.model_dir, PathBuf::from("/r"));
        assert_eq!(cfg.server.metrics_listen, "127.0.0.1:7001");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[server]\nlisen = \"x\"\n").unwrap();
        let err = Config::load_with_env(Some(&file), &Overrides::default(), no_env()).unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
        let env = HashMap::from([("HARDNEG__ENCODER__TOKEN_BUDGET".to_string(), "0".to_string())]);
        let err = Config::load_with_env(None, &Overrides::default(), Some(env)).unwrap_err();
        assert!(err.to_string().contains("encoder.token_budget"), "{err}");
        let flags = Overrides { listen: Some("nowhere".into()), ..Default::default() };
        let err = Config::load_with_env(None, &flags, no_env()).unwrap_err();
        assert!(err.to_string().contains("server.listen"), "{err}");
        for (key, value, field) in [
            ("HARDNEG__ENCODER__DEVICE", "gpu", "encoder.device"),
            ("HARDNEG__RERANKER__DEVICE", "cuda:x", "reranker.device"),
            ("HARDNEG__ENCODER__DTYPE", "f8", "encoder.dtype"),
            ("HARDNEG__RERANKER__DTYPE", "half", "reranker.dtype"),
            ("HARDNEG__ENCODER__CPU_KERNELS", "mkl", "encoder.cpu_kernels"),
            ("HARDNEG__SERVER__TLS_CERT_FILE", "/c.pem", "server.tls_key_file"),
        ] {
            let env = HashMap::from([(key.to_string(), value.to_string())]);
            let err = Config::load_with_env(None, &Overrides::default(), Some(env)).unwrap_err();
            assert!(err.to_string().contains(field), "{key}={value}: {err}");
        }
    }

    #[test]
    fn devices_and_dtypes_parse() {
        assert_eq!(parse_device("cpu"), Ok(DeviceSpec::Cpu));
        assert_eq!(parse_device("cuda"), Ok(DeviceSpec::Cuda(0)));
        assert_eq!(parse_device("cuda:3"), Ok(DeviceSpec::Cuda(3)));
        assert!(parse_device("cuda:").is_err());
        assert_eq!(parse_dtype("bf16"), Ok(DTypeSpec::Bf16));
        assert_eq!(parse_dtype("f16"), Ok(DTypeSpec::F16));
        let cfg = Config::load_with_env(None, &Overrides::default(), no_env()).unwrap();
        assert_eq!((cfg.encoder.device_spec(), cfg.encoder.dtype_spec()), (DeviceSpec::Cpu, DTypeSpec::F32));
        assert_eq!((cfg.reranker.device_spec(), cfg.reranker.dtype_spec()), (DeviceSpec::Cpu, DTypeSpec::F32));
    }
}
