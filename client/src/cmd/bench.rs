//! `hardneg bench`: a load generator for Mine (unary or MineStream), reporting throughput,
//! latency percentiles, errors by gRPC code and the server's stage shares.
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use futures::StreamExt;
use hardneg_client::beir::{self, BeirQuery};
use hardneg_client::{Client, proto};
use serde_json::json;

use crate::cli::BenchFlags;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// What the bench clients saw: latencies of answered requests, summed server stage times
/// (encode, search, filter, total, rerank) and failures by gRPC code.
#[derive(Default)]
struct BenchTally {
    latencies: Vec<f64>,
    stages: [f64; 5],
    errors: std::collections::BTreeMap<String, u64>,
}

impl BenchTally {
    fn ok(&mut self, latency: f64, resp: &proto::MineResponse) {
        self.latencies.push(latency);
        let t = resp.timings.unwrap_or_default();
        for (acc, v) in self.stages.iter_mut().zip([t.encode_seconds, t.search_seconds, t.filter_seconds, t.total_seconds, t.rerank_seconds]) {
            *acc += v;
        }
    }

    fn failed(&mut self, code: Option<hardneg_client::Code>) {
        *self.errors.entry(code.map_or_else(|| "CLIENT".to_string(), code_name)).or_default() += 1;
    }

    fn merge(&mut self, other: BenchTally) {
        self.latencies.extend(other.latencies);
        for (acc, v) in self.stages.iter_mut().zip(other.stages) {
            *acc += v;
        }
        for (code, n) in other.errors {
            *self.errors.entry(code).or_default() += n;
        }
    }
}

/// The canonical name of a gRPC code, e.g. `RESOURCE_EXHAUSTED`.
fn code_name(code: hardneg_client::Code) -> String {
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if i > 0 && c.is_ascii_uppercase() {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// Hands out request numbers to the bench clients until the count or the deadline is reached.
struct Tickets {
    next: std::sync::atomic::AtomicUsize,
    limit: Option<usize>,
    deadline: Option<Instant>,
}

impl Tickets {
    fn take(&self) -> Option<usize> {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.limit.is_none_or(|l| n < l).then_some(n)
    }
}

/// Request number `n`: `batch_size` queries taken cyclically from the file, seeded by `n`.
fn bench_request(flags: &BenchFlags, qs: &[BeirQuery], n: usize) -> proto::MineRequest {
    let rerank = flags.rerank || flags.rerank_candidates.is_some();
    proto::MineRequest {
        collection: flags.collection.clone(),
        batch_id: n as u64,
        queries: (0..flags.batch_size)
            .map(|j| {
                let q = &qs[(n * flags.batch_size + j) % qs.len()];
                proto::Query { id: q.id.clone(), text: q.text.clone(), vector: q.vector.clone(), ..Default::default() }
            })
            .collect(),
        options: Some(proto::MineOptions {
            num_negatives: flags.num_negatives,
            seed: Some(n as u64),
            rerank: rerank.then_some(true),
            rerank_candidates: flags.rerank_candidates,
            ..Default::default()
        }),
        min_generation: None,
    }
}

/// One bench client on unary Mine: one request at a time.
async fn bench_unary(mut client: Client, flags: Arc<BenchFlags>, qs: Arc<Vec<BeirQuery>>, tickets: Arc<Tickets>) -> BenchTally {
    let mut tally = BenchTally::default();
    while let Some(t) = tickets.take() {
        let req = bench_request(&flags, &qs, flags.warmup + t);
        let started = Instant::now();
        match client.mine(req).await {
            Ok(resp) => tally.ok(started.elapsed().as_secs_f64(), &resp),
            Err(e) => tally.failed(e.code()),
        }
    }
    tally
}

/// One bench client on MineStream: up to `window` batches in flight on one stream; latency runs
/// from handing a batch to the stream to its response. A failed stream fails the batches in
/// flight on it, and the next batch opens a new one.
async fn bench_stream(mut client: Client, flags: Arc<BenchFlags>, qs: Arc<Vec<BeirQuery>>, tickets: Arc<Tickets>) -> BenchTally {
    let mut tally = BenchTally::default();
    let mut more = true;
    while more {
        let (tx, rx) = tokio::sync::mpsc::channel(flags.window);
        let mut in_flight = std::collections::VecDeque::new();
        let send = |tx: &tokio::sync::mpsc::Sender<proto::MineRequest>, in_flight: &mut std::collections::VecDeque<(u64, Instant)>| {
            let Some(t) = tickets.take() else { return false };
            let req = bench_request(&flags, &qs, flags.warmup + t);
            in_flight.push_back((req.batch_id, Instant::now()));
            // The channel holds `window` and at most `window` batches are unanswered.
            let _ = tx.try_send(req);
            true
        };
        while in_flight.len() < flags.window && send(&tx, &mut in_flight) {}
        if in_flight.is_empty() {
            break;
        }
        let mut responses = match client.mine_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await {
            Ok(s) => s,
            Err(e) => {
                in_flight.drain(..).for_each(|_| tally.failed(e.code()));
                continue;
            }
        };
        let mut tx = Some(tx);
        while let Some(msg) = responses.next().await {
            match msg {
                Ok(resp) => {
                    let Some((batch_id, started)) = in_flight.pop_front() else { break };
                    if resp.batch_id == batch_id {
                        tally.ok(started.elapsed().as_secs_f64(), &resp);
                    } else {
                        tally.failed(None);
                    }
                    if let Some(s) = &tx
                        && !send(s, &mut in_flight)
                    {
                        // Closing the request stream lets the server end the response stream.
                        tx = None;
                        more = false;
                    }
                }
                Err(status) => {
                    in_flight.drain(..).for_each(|_| tally.failed(Some(status.code())));
                    break;
                }
            }
        }
        // A stream that ended early leaves its unanswered batches failed.
        in_flight.drain(..).for_each(|_| tally.failed(Some(hardneg_client::Code::Unknown)));
    }
    tally
}

/// `hardneg bench`: runs the load and prints its JSON line; false when no request was answered.
pub async fn bench(client: &mut Client, flags: BenchFlags) -> anyhow::Result<bool> {
    if flags.batch_size == 0 || flags.concurrency == 0 || flags.window == 0 || flags.requests == Some(0) {
        bail!("--batch-size, --concurrency, --window and --requests must be at least 1");
    }
    if flags.duration_seconds.is_some_and(|d| !(d > 0.0 && d.is_finite())) {
        bail!("--duration-seconds must be a positive number");
    }
    let qs = beir::read_queries(&flags.queries)?;
    if qs.is_empty() {
        bail!("{}: no queries", flags.queries.display());
    }
    for n in 0..flags.warmup {
        client.mine(bench_request(&flags, &qs, n)).await.context("warm-up request")?;
    }
    let limit = flags.requests.or(flags.duration_seconds.is_none().then_some(50));
    let started = Instant::now();
    let tickets = Arc::new(Tickets {
        next: Default::default(),
        limit,
        deadline: flags.duration_seconds.map(|d| started + std::time::Duration::from_secs_f64(d)),
    });
    let (flags, qs) = (Arc::new(flags), Arc::new(qs));
    let workers: Vec<_> = (0..flags.concurrency)
        .map(|_| {
            let (c, f, q, t) = (client.clone(), flags.clone(), qs.clone(), tickets.clone());
            if flags.stream { tokio::spawn(bench_stream(c, f, q, t)) } else { tokio::spawn(bench_unary(c, f, q, t)) }
        })
        .collect();
    let mut tally = BenchTally::default();
    for w in workers {
        tally.merge(w.await.context("a bench client panicked")?);
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut latencies = tally.latencies;
    latencies.sort_by(f64::total_cmp);
    let ok = latencies.len();
    let failed: u64 = tally.errors.values().sum();
    let stages = tally.stages;
    let total = stages[3].max(1e-12);
    let ms = |p: f64| percentile(&latencies, p) * 1e3;
    println!(
        "{}",
        json!({
            "mode": if flags.stream { "stream" } else { "unary" }, "concurrency": flags.concurrency,
            "window": flags.stream.then_some(flags.window),
            "batch_queries": flags.batch_size, "num_negatives": flags.num_negatives,
            "rerank": flags.rerank || flags.rerank_candidates.is_some(), "rerank_candidates": flags.rerank_candidates,
            "requests": ok as u64 + failed, "ok": ok, "errors": failed, "errors_by_code": tally.errors,
            "seconds": seconds, "requests_per_second": ok as f64 / seconds.max(1e-9),
            "queries_per_second": (ok * flags.batch_size) as f64 / seconds.max(1e-9),
            "p50_ms": ms(0.5), "p95_ms": ms(0.95), "p99_ms": ms(0.99),
            "mean_ms": if ok == 0 { 0.0 } else { latencies.iter().sum::<f64>() / ok as f64 * 1e3 },
            "max_ms": latencies.last().copied().unwrap_or(0.0) * 1e3,
            "server_share": (ok > 0).then(|| json!({
                "encode": stages[0] / total, "search": stages[1] / total, "filter": stages[2] / total,
                "rerank": stages[4] / total, "other": (total - stages[0] - stages[1] - stages[2] - stages[4]) / total})),
        })
    );
    Ok(ok > 0)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn code_names_are_the_canonical_grpc_names() {
        assert_eq!(code_name(hardneg_client::Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
        assert_eq!(code_name(hardneg_client::Code::Ok), "OK");
        assert_eq!(code_name(hardneg_client::Code::DeadlineExceeded), "DEADLINE_EXCEEDED");
        assert_eq!(code_name(hardneg_client::Code::Unavailable), "UNAVAILABLE");
    }

    #[test]
    fn tickets_stop_at_the_request_count_and_at_the_deadline() {
        let counted = Tickets { next: Default::default(), limit: Some(3), deadline: None };
        assert_eq!(std::iter::from_fn(|| counted.take()).collect::<Vec<_>>(), vec![0, 1, 2]);
        let past = Tickets { next: Default::default(), limit: None, deadline: Some(Instant::now()) };
        assert_eq!(past.take(), None);
    }

    #[test]
    fn requests_cycle_through_the_queries_with_their_own_seed() {
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            flags: BenchFlags,
        }
        let args = ["bench", "--collection", "c", "--queries", "q.jsonl", "--batch-size", "3", "--rerank-candidates", "9"];
        let flags = Wrap::try_parse_from(args).expect("valid flags").flags;
        let qs: Vec<BeirQuery> = (0..4).map(|i| BeirQuery { id: i.to_string(), text: format!("query {i}"), vector: Vec::new() }).collect();
        let req = bench_request(&flags, &qs, 1);
        assert_eq!(req.queries.iter().map(|q| q.id.as_str()).collect::<Vec<_>>(), vec!["3", "0", "1"]);
        let options = req.options.expect("options set");
        assert_eq!((options.seed, options.rerank, options.rerank_candidates), (Some(1), Some(true), Some(9)));
    }
}
