//! Test support: starts the real `hardneg-server` binary on 127.0.0.1 with a free port and a
//! temporary data dir, and locates the datasets and the model.
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hardneg_client::{Client, ConnectOptions};

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A binary of this workspace, built in the same profile as the running test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let path = exe.parent().and_then(Path::parent).expect("test runs from target/<profile>/deps").join(name);
    assert!(path.exists(), "{} is missing: build the binaries first (`cargo build --workspace`; scripts/test does)", path.display());
    path
}

/// ../shared/datasets/<name>, or $HARDNEG_DATASETS/<name>.
pub fn dataset(name: &str) -> PathBuf {
    let base = std::env::var_os("HARDNEG_DATASETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("../shared/datasets"));
    let dir = base.join(name);
    assert!(dir.join("corpus.jsonl").exists(), "{} has no corpus.jsonl (set HARDNEG_DATASETS)", dir.display());
    dir
}

/// models/all-MiniLM-L6-v2, or $HARDNEG_MODEL_DIR.
pub fn model_dir() -> PathBuf {
    let dir = std::env::var_os("HARDNEG_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("models/all-MiniLM-L6-v2"));
    assert!(dir.join("model.safetensors").exists(), "{}: run scripts/fetch-models", dir.display());
    dir
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running server process; killed on drop unless stopped.
pub struct Server {
    child: Option<Child>,
    pub addr: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    /// How [`Server::client`] connects (TLS CA, token).
    pub connect: ConnectOptions,
}

impl Server {
    /// Starts the server on a fresh port over `data_dir` and waits until it reports SERVING.
    pub async fn start(data_dir: &Path) -> Self {
        Self::start_with(data_dir, &[]).await
    }

    /// As [`Server::start`], with extra `HARDNEG__SECTION__KEY` environment settings.
    pub async fn start_with(data_dir: &Path, env: &[(&str, &str)]) -> Self {
        Self::start_with_model(data_dir, &model_dir(), env).await
    }

    /// As [`Server::start_with`], with `model` as the server's encoder.
    pub async fn start_with_model(data_dir: &Path, model: &Path, env: &[(&str, &str)]) -> Self {
        Self::launch(data_dir, model, env, "http://127.0.0.1", ConnectOptions::default()).await
    }

    /// As [`Server::start_with`] for a server with TLS on (its certificate and key given in
    /// `env`): clients connect to https://localhost:PORT trusting `ca_pem`.
    pub async fn start_tls(data_dir: &Path, env: &[(&str, &str)], ca_pem: &[u8]) -> Self {
        let connect = ConnectOptions { tls_ca_pem: Some(ca_pem.to_vec()), ..Default::default() };
        Self::launch(data_dir, &model_dir(), env, "https://localhost", connect).await
    }

    async fn launch(data_dir: &Path, model: &Path, env: &[(&str, &str)], base: &str, connect: ConnectOptions) -> Self {
        let port = free_port();
        let log = data_dir.with_extension(format!("{port}.log"));
        let mut cmd = Command::new(bin("hardneg-server"));
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--model-dir")
            .arg(model)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn hardneg-server");
        let mut server = Server {
            child: Some(child),
            addr: format!("{base}:{port}"),
            data_dir: data_dir.to_path_buf(),
            log,
            connect,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = server.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("server exited with {status} during startup:\n{}", server.log_text());
            }
            if let Ok(mut c) = Client::connect_with(&server.addr, &server.connect).await {
                if c.ready().await.unwrap_or(false) {
                    return server;
                }
            }
            assert!(Instant::now() < deadline, "server not ready in 120 s:\n{}", server.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn client(&self) -> Client {
        Client::connect_with(&self.addr, &self.connect).await.expect("connect to test server")
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server is running").id()
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        let id = self.child.as_ref().expect("server is running").id();
        let status = Command::new("kill").arg("-TERM").arg(id.to_string()).status().unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit, at most `limit`; its status (the process is killed and
    /// the test fails past the limit).
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("server is running");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("server did not exit within {limit:?}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then wait for a clean exit (status 0) within `limit`.
    pub fn stop(mut self, limit: Duration) {
        self.sigterm();
        let status = self.wait_exit(limit);
        assert!(status.success(), "server exited with {status}:\n{}", self.log_text());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// GET http://addr/metrics over a plain socket; the whole HTTP response (status 200 checked).
pub async fn scrape_metrics(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    socket.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}
