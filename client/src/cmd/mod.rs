//! One module per command; [`run`] connects and dispatches.
mod bench;
mod create;
mod eval;
mod ingest;
mod mine;
mod refresh;

use anyhow::Context;
use hardneg_client::{Client, proto};
use serde_json::json;

use crate::cli::{Cli, Command};

/// Connects and runs the command; false when it ran but failed (health, bench).
pub async fn run(cli: Cli) -> anyhow::Result<bool> {
    let tls_ca_pem = match &cli.tls_ca {
        Some(path) => Some(std::fs::read(path).with_context(|| format!("--tls-ca {}", path.display()))?),
        None => None,
    };
    let options = hardneg_client::ConnectOptions { token: cli.token.clone(), tls_ca_pem, tls_domain: cli.tls_domain.clone() };
    let mut client = Client::connect_with(&cli.addr, &options).await.with_context(|| format!("is hardneg-server running at {}?", cli.addr))?;
    match cli.command {
        Command::Create(flags) => {
            let info = client.create(create::request(&flags)).await?;
            println!("{}", info_json(&info));
        }
        Command::Ingest { collection, corpus, vectors, ids, batch_size } => {
            let input = ingest::Input { corpus, vectors, ids };
            ingest::ingest(&mut client, &collection, &input, batch_size).await?
        }
        Command::Mine { collection, queries, qrels, pairs, format, opts } => {
            mine::mine(&mut client, &collection, queries, qrels, pairs, format, &opts).await?
        }
        Command::Eval { collection, queries, qrels, opts } => eval::eval(&mut client, &collection, &queries, &qrels, &opts).await?,
        Command::Status => {
            for info in client.list_collections().await? {
                println!("{}", info_json(&info));
            }
        }
        Command::Health => return Ok(client.ready().await.unwrap_or(false)),
        Command::Refresh { collection, encoder, vectors, ids, encoder_name, batch_size, cancel } => {
            if cancel {
                let r = client.cancel_refresh(&collection).await?;
                println!("{}", json!({"collection": collection, "cancelled": r.cancelled, "what": r.what}));
            } else if let Some(dir) = encoder {
                refresh::reencode(&mut client, &collection, &dir).await?;
            } else if let (Some(path), Some(name)) = (vectors, encoder_name) {
                refresh::upload(&mut client, &collection, &path, ids.as_ref(), &name, batch_size).await?;
            }
        }
        Command::Drop { collection } => {
            let dropped = client.drop_collection(&collection).await?;
            println!("{}", json!({"collection": collection, "dropped": dropped}));
        }
        Command::Bench(flags) => return bench::bench(&mut client, flags).await,
    }
    Ok(true)
}

fn info_json(info: &proto::CollectionInfo) -> serde_json::Value {
    let quant = match proto::Quantization::try_from(info.quantization) {
        Ok(proto::Quantization::F16) => "f16",
        Ok(proto::Quantization::I8) => "i8",
        _ => "f32",
    };
    let metric = match proto::Metric::try_from(info.metric) {
        Ok(proto::Metric::InnerProduct) => "ip",
        _ => "cosine",
    };
    json!({"name": info.name, "doc_count": info.doc_count, "dims": info.dims, "metric": metric, "quantization": quant,
           "generation": info.generation, "encoder": info.encoder_name, "encoder_kind": info.encoder_kind,
           "encoder_fingerprint": info.encoder_fingerprint, "query_prompt": info.query_prompt,
           "document_prompt": info.document_prompt, "vectors_only": info.vectors_only,
           "pending_documents": info.pending_documents,
           "building_generation": info.building_generation,
           "refresh": info.refresh.as_ref().map(|p| json!({"generation": p.generation, "phase": p.phase, "done": p.done, "total": p.total}))})
}
