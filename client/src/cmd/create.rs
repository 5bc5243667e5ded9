//! `hardneg create`: a collection bound to the server's encoder, or a vectors-only one.
use hardneg_client::proto;

use crate::cli::{CreateFlags, MetricArg, Quant};

/// The CreateCollection request the flags ask for (clap has refused prompts with --dims).
pub fn request(flags: &CreateFlags) -> proto::CreateCollectionRequest {
    let quantization = match flags.quantization {
        Quant::F32 => proto::Quantization::F32,
        Quant::F16 => proto::Quantization::F16,
        Quant::I8 => proto::Quantization::I8,
    } as i32;
    let metric = match flags.metric {
        MetricArg::Cosine => proto::Metric::Cosine,
        MetricArg::Ip => proto::Metric::InnerProduct,
    } as i32;
    proto::CreateCollectionRequest {
        name: flags.collection.clone(),
        metric,
        quantization,
        query_prompt: flags.query_prompt.clone(),
        document_prompt: flags.document_prompt.clone(),
        dims: flags.dims.unwrap_or(0),
        encoder_name: flags.encoder_name.clone().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        flags: CreateFlags,
    }

    fn parse(args: &[&str]) -> Result<CreateFlags, clap::Error> {
        Wrap::try_parse_from(["create", "--collection", "c"].iter().chain(args)).map(|w| w.flags)
    }

    #[test]
    fn dims_and_encoder_name_make_a_vectors_only_request() {
        let req = request(&parse(&["--dims", "16", "--encoder-name", "step-9", "--metric", "ip"]).unwrap());
        assert_eq!((req.name.as_str(), req.dims, req.encoder_name.as_str()), ("c", 16, "step-9"));
        assert_eq!(req.metric, proto::Metric::InnerProduct as i32);
        let plain = request(&parse(&["--query-prompt", ""]).unwrap());
        assert_eq!((plain.dims, plain.encoder_name.as_str(), plain.query_prompt.as_deref()), (0, "", Some("")));
    }

    #[test]
    fn dims_refuse_prompts_and_zero_and_encoder_name_needs_dims() {
        for prompt in ["--query-prompt", "--document-prompt"] {
            let err = parse(&["--dims", "16", prompt, "passage: "]).err().expect("refused");
            assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
        }
        assert!(parse(&["--dims", "0"]).is_err());
        assert!(parse(&["--encoder-name", "x"]).is_err());
    }
}
