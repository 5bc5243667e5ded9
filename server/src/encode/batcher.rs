//! The model's owner thread: collects pending encode jobs, sorts their texts by length and
//! cuts them into model batches bounded by a padded-token budget, so short texts are not
//! padded to long ones and concurrent requests share forward passes.
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, oneshot};

use super::{EmbedModel, EncodeError, TokenizedText};

#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Padded tokens per model batch (texts x longest text).
    pub token_budget: usize,
    /// Texts per model batch at most.
    pub max_batch_texts: usize,
    /// Jobs queued for the model thread at most; submitters wait beyond it.
    pub queue_capacity: usize,
}

struct Job {
    texts: Vec<TokenizedText>,
    reply: oneshot::Sender<Result<Vec<Vec<f32>>, EncodeError>>,
    queued: std::time::Instant,
}

pub(super) struct Handle {
    tx: mpsc::Sender<Job>,
    abandoned: Arc<AtomicU64>,
    /// "encoder" or "reranker": the `model` label of its metrics.
    model: &'static str,
}

impl Handle {
    pub(super) async fn submit(
        &self,
        texts: Vec<TokenizedText>,
    ) -> Result<Vec<Vec<f32>>, EncodeError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Job { texts, reply, queued: std::time::Instant::now() }).await.map_err(|_| EncodeError::Stopped)?;
        let depth = self.tx.max_capacity() - self.tx.capacity();
        metrics::gauge!(crate::metrics::MODEL_QUEUE_DEPTH, "model" => self.model).set(depth as f64);
        rx.await.map_err(|_| EncodeError::Stopped)?
    }

    pub(super) fn abandoned(&self) -> u64 {
        self.abandoned.load(Ordering::Relaxed)
    }
}

/// Starts the model's thread; `name` ("encoder", "reranker") labels its thread and metrics.
pub(super) fn spawn(model: Box<dyn EmbedModel>, cfg: BatchConfig, name: &'static str) -> Handle {
    let (tx, rx) = mpsc::channel(cfg.queue_capacity);
    let abandoned = Arc::new(AtomicU64::new(0));
    let counter = abandoned.clone();
    std::thread::Builder::new()
        .name(format!("hardneg-{name}"))
        .spawn(move || run(model, rx, cfg, &counter, name))
        .expect("spawning a model thread must succeed at startup");
    Handle { tx, abandoned, model: name }
}

fn run(
    mut model: Box<dyn EmbedModel>,
    mut rx: mpsc::Receiver<Job>,
    cfg: BatchConfig,
    abandoned: &AtomicU64,
    name: &'static str,
) {
    while let Some(first) = rx.blocking_recv() {
        let mut jobs = vec![first];
        // Everything already waiting joins this round; later arrivals wait for the next.
        while jobs.len() < cfg.queue_capacity {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        jobs.retain(|job| {
            let alive = !job.reply.is_closed();
            if !alive {
                abandoned.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(crate::metrics::MODEL_ABANDONED, "model" => name).increment(1);
            }
            alive
        });
        if jobs.is_empty() {
            continue;
        }
        for job in &jobs {
            crate::metrics::stage("queue_wait", job.queued.elapsed().as_secs_f64());
        }
        let results = encode_round(model.as_mut(), &jobs, cfg, name);
        for (job, result) in jobs.into_iter().zip(results) {
            let _ = job.reply.send(result);
        }
    }
}

/// Plans model batches over `lens` (token counts): indices sorted by length, longest first,
/// grouped while texts x longest <= budget and texts <= max_texts. A text longer than the
/// budget gets a batch of its own.
pub fn plan_batches(lens: &[usize], token_budget: usize, max_texts: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by(|&a, &b| lens[b].cmp(&lens[a]).then(a.cmp(&b)));
    let mut batches = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut longest = 0;
    for i in order {
        // Longest first: the batch's padded length is its first text's length.
        let padded = if current.is_empty() { lens[i] } else { longest };
        if !current.is_empty()
            && ((current.len() + 1) * padded > token_budget || current.len() >= max_texts)
        {
            batches.push(std::mem::take(&mut current));
        }
        if current.is_empty() {
            longest = lens[i].max(1);
        }
        current.push(i);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

fn encode_round(
    model: &mut dyn EmbedModel,
    jobs: &[Job],
    cfg: BatchConfig,
    name: &'static str,
) -> Vec<Result<Vec<Vec<f32>>, EncodeError>> {
    let flat: Vec<(usize, usize)> = jobs
        .iter()
        .enumerate()
        .flat_map(|(j, job)| (0..job.texts.len()).map(move |t| (j, t)))
        .collect();
    let lens: Vec<usize> = flat.iter().map(|&(j, t)| jobs[j].texts[t].ids.len()).collect();
    let mut outputs: Vec<Vec<Option<Vec<f32>>>> =
        jobs.iter().map(|job| vec![None; job.texts.len()]).collect();
    let mut failed: Vec<Option<String>> = vec![None; jobs.len()];
    for batch in plan_batches(&lens, cfg.token_budget, cfg.max_batch_texts) {
        let inputs: Vec<&TokenizedText> =
            batch.iter().map(|&i| &jobs[flat[i].0].texts[flat[i].1]).collect();
        let longest = inputs.iter().map(|t| t.ids.len()).max().unwrap_or(0);
        metrics::histogram!(crate::metrics::MODEL_BATCH_TEXTS, "model" => name).record(inputs.len() as f64);
        metrics::histogram!(crate::metrics::MODEL_BATCH_TOKENS, "model" => name).record((inputs.len() * longest) as f64);
        match model.embed(&inputs) {
            Ok(vectors) => {
                for (&i, v) in batch.iter().zip(vectors) {
                    outputs[flat[i].0][flat[i].1] = Some(v);
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for &i in &batch {
                    failed[flat[i].0] = Some(msg.clone());
                }
            }
        }
    }
    outputs
        .into_iter()
        .zip(failed)
        .map(|(vectors, failure)| match failure {
            Some(msg) => Err(EncodeError::Model(candle_core::Error::Msg(msg))),
            None => Ok(vectors
                .into_iter()
                .map(|v| v.expect("every text of a job belongs to exactly one batch"))
                .collect()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_respect_budget_and_cover_every_text_once() {
        let lens = [10, 200, 30, 30, 5, 120, 64, 7, 7, 300];
        let batches = plan_batches(&lens, 256, 3);
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..lens.len()).collect::<Vec<_>>());
        for b in &batches {
            let longest = b.iter().map(|&i| lens[i]).max().unwrap();
            assert!(b.len() <= 3);
            assert!(b.len() == 1 || b.len() * longest <= 256, "{b:?}");
            // Sorted longest first within and across batches.
            assert!(b.windows(2).all(|w| lens[w[0]] >= lens[w[1]]));
        }
        assert_eq!(batches[0], vec![9], "a text over the budget runs alone");
    }

    /// A deterministic model: the vector is [len, first id] normalized; records batch sizes.
    struct Recorder(std::sync::Arc<parking_lot::Mutex<Vec<usize>>>);
    impl EmbedModel for Recorder {
        fn embed(&mut self, batch: &[&TokenizedText]) -> Result<Vec<Vec<f32>>, EncodeError> {
            self.0.lock().push(batch.len());
            Ok(batch.iter().map(|t| vec![t.ids.len() as f32, t.ids[0] as f32]).collect())
        }
        fn dims(&self) -> usize {
            2
        }
    }

    #[tokio::test]
    async fn concurrent_jobs_get_their_own_results_in_order() {
        let sizes = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
        let handle = spawn(
            Box::new(Recorder(sizes.clone())),
            BatchConfig { token_budget: 64, max_batch_texts: 8, queue_capacity: 16 },
            "test"
        );
        let handle = std::sync::Arc::new(handle);
        let mut tasks = Vec::new();
        for j in 0..8u32 {
            let h = handle.clone();
            tasks.push(tokio::spawn(async move {
                let texts: Vec<TokenizedText> = (0..5u32)
                    .map(|t| TokenizedText { ids: vec![j * 100 + t; (t as usize % 3) + 1], type_ids: vec![0; (t as usize % 3) + 1], prompt_len: 0 })
                    .collect();
                let out = h.submit(texts.clone()).await.unwrap();
                for (t, v) in texts.iter().zip(out) {
                    assert_eq!(v, vec![t.ids.len() as f32, t.ids[0] as f32]);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert!(sizes.lock().iter().all(|&n| n <= 8));
        assert_eq!(sizes.lock().iter().sum::<usize>(), 40);
    }
}
