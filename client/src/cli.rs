//! The command line: global connection flags, one subcommand per operation, and the flags
//! the mining commands share.
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use hardneg_client::proto;

#[derive(Parser)]
#[command(name = "hardneg", version, about = "Client for the hardneg hard-negative mining service")]
pub struct Cli {
    /// Server address.
    #[arg(long, global = true, default_value = "http://127.0.0.1:50051", env = "HARDNEG_ADDR")]
    pub addr: String,
    /// Bearer token, for servers with auth on.
    #[arg(long, global = true, env = "HARDNEG_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM file of the CA that signed the server's TLS certificate (https:// addresses; without
    /// it, the system's roots are trusted).
    #[arg(long, global = true, env = "HARDNEG_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// The name the server's certificate is checked against, when not the address's host.
    #[arg(long, global = true, env = "HARDNEG_TLS_DOMAIN")]
    pub tls_domain: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Create a collection bound to the server's encoder, or (--dims) a vectors-only one.
    Create(CreateFlags),
    /// Ingest a BEIR corpus.jsonl ({"_id","title","text"}); the encoded text is title + " " + text.
    /// A vectors-only collection takes each document's vector from its line's "vector" or from
    /// --vectors; the whole input is checked before the first document is sent.
    Ingest {
        #[arg(long)]
        collection: String,
        /// BEIR corpus.jsonl; a line may carry "vector": [floats], its document's embedding.
        #[arg(long, required_unless_present = "vectors")]
        corpus: Option<PathBuf>,
        /// Document vectors, read as `refresh --vectors` reads them: a .npy float32/float64
        /// matrix with --ids, or JSONL of {"id","vector"}. With --corpus, each corpus document
        /// takes the row of its id (every document needs one, and every row a document);
        /// without it, each row is a document whose text is its id.
        #[arg(long)]
        vectors: Option<PathBuf>,
        /// For .npy vectors: document ids, one per line, in row order.
        #[arg(long, requires = "vectors")]
        ids: Option<PathBuf>,
        /// Documents per Upsert call (each call is durable when it returns).
        #[arg(long, default_value_t = 256)]
        batch_size: usize,
    },
    /// Mine hard negatives; one JSON line per query on stdout.
    Mine {
        #[arg(long)]
        collection: String,
        /// BEIR queries.jsonl (with --qrels).
        #[arg(long, requires = "qrels", conflicts_with = "pairs")]
        queries: Option<PathBuf>,
        /// BEIR qrels TSV: a query's positive is its highest-scored judged document.
        #[arg(long, requires = "queries")]
        qrels: Option<PathBuf>,
        /// JSONL of {"query": ..., "positive": ...} or {"query": ..., "positive_id": ...}; a
        /// "vector": [floats] may stand in for (or go with) the query text.
        #[arg(long, required_unless_present = "queries")]
        pairs: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = Format::Jsonl)]
        format: Format,
        #[command(flatten)]
        opts: MineFlags,
    },
    /// Quality protocol: hide every judged document but the positive, mine, and count leaks.
    Eval {
        #[arg(long)]
        collection: String,
        #[arg(long)]
        queries: PathBuf,
        #[arg(long)]
        qrels: PathBuf,
        #[command(flatten)]
        opts: MineFlags,
    },
    /// Move a collection to a new index generation: re-encode every document with a checkpoint
    /// (--encoder, a directory under the server's encoder.models_root), or upload the trainer's
    /// own vectors and commit them (--vectors with --encoder-name), or --cancel either.
    Refresh {
        #[arg(long)]
        collection: String,
        /// Checkpoint directory to re-encode with (relative to the server's models root).
        #[arg(long, conflicts_with_all = ["vectors", "cancel"], required_unless_present_any = ["vectors", "cancel"])]
        encoder: Option<String>,
        /// JSONL of {"id","vector"}, or a .npy float32/float64 matrix with --ids.
        #[arg(long, requires = "encoder_name", conflicts_with = "cancel")]
        vectors: Option<PathBuf>,
        /// For .npy vectors: document ids, one per line, in row order.
        #[arg(long, requires = "vectors")]
        ids: Option<PathBuf>,
        /// Names the encoder the uploaded vectors came from (e.g. a checkpoint step).
        #[arg(long)]
        encoder_name: Option<String>,
        /// Vectors per upload message.
        #[arg(long, default_value_t = 1024)]
        batch_size: usize,
        /// Cancel a running re-encode or discard pending uploaded vectors.
        #[arg(long)]
        cancel: bool,
    },
    /// Every collection with its size, generation and pending documents.
    Status,
    /// Exit 0 when the server is serving, 1 otherwise.
    Health,
    /// Drop a collection with all its documents.
    Drop {
        #[arg(long)]
        collection: String,
    },
    /// Load generator for Mine: concurrent clients, throughput, p50/p95/p99 latency, errors by
    /// gRPC code and the share of each server stage, as one JSON line.
    Bench(BenchFlags),
}

/// `hardneg create` options.
#[derive(Args, Clone)]
pub struct CreateFlags {
    #[arg(long)]
    pub collection: String,
    #[arg(long, value_enum, default_value_t = MetricArg::Cosine)]
    pub metric: MetricArg,
    #[arg(long, value_enum, default_value_t = Quant::F32)]
    pub quantization: Quant,
    /// Prompt for query texts in place of the model's own ("" for none).
    #[arg(long)]
    pub query_prompt: Option<String>,
    /// Prompt for document and positive texts in place of the model's own ("" for none).
    #[arg(long)]
    pub document_prompt: Option<String>,
    /// Make a vectors-only collection of this many dims: the server encodes no text, so it
    /// takes no prompts; every document carries its vector (ingest: "vector" or --vectors) and
    /// queries carry vectors.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=65536), conflicts_with_all = ["query_prompt", "document_prompt"])]
    pub dims: Option<u32>,
    /// With --dims: the name of the encoder the vectors come from (server default "trainer").
    #[arg(long, requires = "dims")]
    pub encoder_name: Option<String>,
}

/// `hardneg bench` options.
#[derive(Args, Clone)]
pub struct BenchFlags {
    #[arg(long)]
    pub collection: String,
    /// BEIR queries.jsonl to draw queries (texts or "vector"s) from, cycled through in file order.
    #[arg(long)]
    pub queries: PathBuf,
    /// Clients sending at once; each is a clone of the CLI's channel, so their calls share one
    /// HTTP/2 connection (and its TLS and token settings).
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Measured requests in all clients together (50 when --duration-seconds is not given either).
    #[arg(long, visible_alias = "iterations")]
    pub requests: Option<usize>,
    /// Start no request after this many seconds; with --requests, whichever bound comes first.
    #[arg(long)]
    pub duration_seconds: Option<f64>,
    /// Unmeasured requests sent first, one at a time; a failure there stops the bench.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[arg(long, default_value_t = 8)]
    pub num_negatives: u32,
    /// Queries per request.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Rerank with the server's cross-encoder.
    #[arg(long)]
    pub rerank: bool,
    /// Candidates the cross-encoder scores per query (implies --rerank).
    #[arg(long)]
    pub rerank_candidates: Option<u32>,
    /// Drive MineStream instead of unary Mine: each client keeps one stream open.
    #[arg(long)]
    pub stream: bool,
    /// With --stream: batches each stream keeps in flight.
    #[arg(long, default_value_t = 2)]
    pub window: usize,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum MetricArg {
    Cosine,
    Ip,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Quant {
    F32,
    F16,
    I8,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
pub enum Format {
    /// One line per query with its negatives and drop counts.
    Jsonl,
    /// sentence-transformers style: one {"anchor","positive","negative"} line per negative.
    Triplet,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum SamplingFlag {
    Top,
    Uniform,
    Softmax,
    /// SimANS: around the positive's score (--simans-a, --simans-b).
    Ambiguous,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
pub enum PresetFlag {
    /// Only the options given.
    None,
    /// relative_margin 0.05, max_positive_similarity and adaptive depth (see README).
    Denoised,
}

/// Mining options, named after their proto fields. Unset options take the preset's value,
/// then the server's default.
#[derive(Args, Clone)]
pub struct MineFlags {
    /// Settings to start from; the flags given here override them.
    #[arg(long, value_enum, default_value_t = PresetFlag::None)]
    pub preset: PresetFlag,
    #[arg(long, default_value_t = 5)]
    pub num_negatives: u32,
    #[arg(long, default_value_t = 0)]
    pub range_min: u32,
    #[arg(long)]
    pub range_max: Option<u32>,
    #[arg(long)]
    pub min_score: Option<f32>,
    #[arg(long)]
    pub max_score: Option<f32>,
    #[arg(long)]
    pub absolute_margin: Option<f32>,
    #[arg(long)]
    pub relative_margin: Option<f32>,
    #[arg(long, value_enum, default_value_t = SamplingFlag::Top)]
    pub sampling: SamplingFlag,
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Ambiguous sampling: weight exp(-a (score - positive - b)^2) (server default a).
    #[arg(long)]
    pub simans_a: Option<f32>,
    /// Ambiguous sampling: the peak's offset from the positive's score (server default b).
    #[arg(long, allow_hyphen_values = true)]
    pub simans_b: Option<f32>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Search deeper when filters leave too few (server default: true).
    #[arg(long, action = clap::ArgAction::Set)]
    pub adaptive_depth: Option<bool>,
    /// Exclude the batch's other positives (server default: true).
    #[arg(long, action = clap::ArgAction::Set)]
    pub exclude_batch_positives: Option<bool>,
    /// Drop candidates whose cosine similarity to one of the query's positives is above this.
    #[arg(long)]
    pub max_positive_similarity: Option<f32>,
    /// Score candidates with the server's cross-encoder; filter, order and sample by it.
    #[arg(long)]
    pub rerank: bool,
    /// Candidates scored per query (default 3 x num-negatives).
    #[arg(long, requires = "rerank")]
    pub rerank_candidates: Option<u32>,
    /// Drop candidates whose cross-encoder probability is at least this.
    #[arg(long, requires = "rerank")]
    pub ce_max_score: Option<f32>,
    /// Drop candidates whose cross-encoder probability is at least the positive's x (1 - m).
    #[arg(long, requires = "rerank")]
    pub ce_relative_margin: Option<f32>,
    /// Queries per Mine request.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
}

impl MineFlags {
    /// The request options these flags ask for.
    pub fn options(&self, return_text: bool) -> proto::MineOptions {
        proto::MineOptions {
            num_negatives: self.num_negatives,
            range_min: self.range_min,
            range_max: self.range_max,
            min_score: self.min_score,
            max_score: self.max_score,
            absolute_margin: self.absolute_margin,
            relative_margin: self.relative_margin,
            sampling: match self.sampling {
                SamplingFlag::Top => proto::Sampling::Top,
                SamplingFlag::Uniform => proto::Sampling::Uniform,
                SamplingFlag::Softmax => proto::Sampling::Softmax,
                SamplingFlag::Ambiguous => proto::Sampling::Ambiguous,
            } as i32,
            temperature: self.temperature,
            simans_a: self.simans_a,
            simans_b: self.simans_b,
            seed: self.seed,
            adaptive_depth: self.adaptive_depth,
            exclude_batch_positives: self.exclude_batch_positives,
            return_text,
            preset: match self.preset {
                PresetFlag::None => proto::Preset::Unspecified,
                PresetFlag::Denoised => proto::Preset::Denoised,
            } as i32,
            rerank: self.rerank.then_some(true),
            rerank_candidates: self.rerank_candidates,
            ce_max_score: self.ce_max_score,
            ce_relative_margin: self.ce_relative_margin,
            max_positive_similarity: self.max_positive_similarity,
        }
    }
}
