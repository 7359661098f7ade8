//! `caep-drill --soak MINUTES --rate N`: a constant workload against one
//! hub for a long time, to show that what the hub keeps stays bounded.
//!
//! Every second, N agent sessions are established (a quarter of them as
//! sub-agents of a recent session), each touched by two of the receivers;
//! a third of the roots are revoked some seconds later, the rest are left
//! to expire. The hub runs with lifetimes of minutes. Every interval the
//! soak samples the sessions the hub keeps, its redb file's size, its RSS,
//! the leaf latency of the revocations in the interval and the pruning
//! counters, as one JSON line; at the end it prints a summary by thirds of
//! the run and can plot bytes and RSS over time.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::body::Bytes;
use axum::http::StatusCode;
use caep_schemas::event::{Event, SessionEstablished, SessionRevoked};
use caep_schemas::jose::{Algorithm, Jwks, SigningKey};
use caep_schemas::set::SecurityEventToken;
use caep_schemas::subject::SubjectId;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::accounting::Percentiles;
use crate::hub::SpawnedHub;

/// What the soak runs.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    /// How long the workload runs.
    pub duration: Duration,
    /// Sessions established per second.
    pub rate: f64,
    /// Time between two samples.
    pub interval: Duration,
    /// Push receivers (each session touches two).
    pub receivers: usize,
    /// Share of root sessions revoked (the rest expire).
    pub revoke_share: f64,
    /// Requests in flight at most.
    pub concurrency: usize,
}

/// The hub settings a soak runs with: lifetimes of a few minutes.
pub fn hub_env(ttl_secs: u64) -> Vec<(String, String)> {
    let ttl = ttl_secs.to_string();
    vec![
        ("CAEP_HUB_SESSION_IDLE_TTL_SECS".into(), ttl.clone()),
        ("CAEP_HUB_REVOKED_RETENTION_SECS".into(), ttl.clone()),
        ("CAEP_HUB_CASCADE_RETENTION_SECS".into(), ttl.clone()),
        ("CAEP_HUB_DEAD_LETTER_RETENTION_SECS".into(), ttl.clone()),
        ("CAEP_HUB_MAX_SET_AGE_SECS".into(), ttl),
        ("CAEP_HUB_PRUNE_INTERVAL_SECS".into(), (ttl_secs / 12).clamp(1, 60).to_string()),
    ]
}

/// One sample.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the soak started.
    pub t_s: f64,
    /// Sessions established so far.
    pub established_total: u64,
    /// Root sessions revoked so far.
    pub revoked_total: u64,
    /// Sessions the hub keeps (`caep_graph_sessions`).
    pub live_sessions: u64,
    /// Cascade reports the hub keeps (`caep_cascades_kept`).
    pub cascades_kept: u64,
    /// Size of the hub's redb file.
    pub db_bytes: u64,
    /// The hub process's resident set size.
    pub rss_bytes: u64,
    /// Leaves received in the interval.
    pub leaves: usize,
    /// Their median latency (revocation posted → receiver got the SET).
    pub leaf_p50_ms: f64,
    /// Their 99th percentile latency.
    pub leaf_p99_ms: f64,
    /// `caep_pruned_total` by kind, cumulative.
    pub pruned: HashMap<String, u64>,
}

/// What the soak remembers of its sessions, shared with the receivers'
/// handlers: enough to tell each arriving SET's latency.
struct Ledger {
    epoch: Instant,
    /// Session → (its root, when it was established, ms).
    root_of: Mutex<HashMap<String, (String, f64)>>,
    /// Root → when its revocation was posted (ms).
    revoked_at: Mutex<HashMap<String, f64>>,
    /// Latencies of the SETs received since the last sample.
    latencies_ms: Mutex<Vec<f64>>,
}

impl Ledger {
    fn now_ms(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64() * 1000.0
    }

    /// A receiver got a SET: its latency, if it is a revocation the soak posted.
    fn arrived(&self, body: &[u8]) {
        let Some(session) = session_of(body) else { return };
        let now = self.now_ms();
        let root = self.root_of.lock().ok().and_then(|roots| roots.get(&session).map(|(root, _)| root.clone()));
        let posted = root.and_then(|root| self.revoked_at.lock().ok().and_then(|r| r.get(&root).copied()));
        if let (Some(posted), Ok(mut latencies)) = (posted, self.latencies_ms.lock()) {
            latencies.push(now - posted);
        }
    }

    /// Forgets sessions older than `age_ms`: the soak stays bounded too.
    fn forget_older_than(&self, age_ms: f64) {
        let horizon = self.now_ms() - age_ms;
        if let Ok(mut roots) = self.root_of.lock() {
            roots.retain(|_, (_, at)| *at >= horizon);
        }
        if let Ok(mut revoked) = self.revoked_at.lock() {
            revoked.retain(|_, at| *at >= horizon);
        }
    }

    fn take_latencies(&self) -> Vec<f64> {
        self.latencies_ms.lock().map(|mut l| std::mem::take(&mut *l)).unwrap_or_default()
    }
}

/// The simulated IdP and receivers driving the workload.
struct Soak {
    client: reqwest::Client,
    hub: String,
    idp: String,
    key: SigningKey,
    /// Receiver tokens and stream ids.
    streams: Vec<(String, String)>,
    ledger: Arc<Ledger>,
    established: AtomicU64,
    revoked: AtomicU64,
    permits: Semaphore,
}

impl Soak {
    async fn ingest(&self, subject: SubjectId, event: Event) -> anyhow::Result<()> {
        let token = SecurityEventToken::new(self.idp.as_str(), self.hub.as_str(), subject, event).sign(&self.key)?;
        for attempt in 0..20 {
            let sent = self
                .client
                .post(format!("{}/ingest", self.hub))
                .header("content-type", "application/secevent+jwt")
                .body(token.clone())
                .send()
                .await;
            match sent {
                Ok(response) if response.status() == StatusCode::ACCEPTED => return Ok(()),
                Ok(response) if !response.status().is_server_error() => {
                    anyhow::bail!("ingest: {} {}", response.status(), response.text().await.unwrap_or_default())
                }
                _ => tokio::time::sleep(Duration::from_millis(50 * (attempt + 1))).await,
            }
        }
        anyhow::bail!("ingest kept failing")
    }

    async fn touch(&self, receiver: usize, session: &str) -> anyhow::Result<()> {
        let (token, stream_id) = &self.streams[receiver];
        let body = json!({"stream_id": stream_id, "subject": {"format": "complex",
            "session": {"format": "opaque", "id": session}}});
        for attempt in 0..20 {
            let url = format!("{}/ssf/subjects/add", self.hub);
            match self.client.post(url).bearer_auth(token).json(&body).send().await {
                Ok(response) if response.status().is_success() => return Ok(()),
                Ok(response) if !response.status().is_server_error() && response.status() != 429 => {
                    anyhow::bail!("add subject: {} {}", response.status(), response.text().await.unwrap_or_default())
                }
                _ => tokio::time::sleep(Duration::from_millis(50 * (attempt + 1))).await,
            }
        }
        anyhow::bail!("add subject kept failing")
    }

    /// Establishes session `n` (under `parent` if given) and has two receivers touch it.
    async fn session(&self, n: u64, parent: Option<String>) -> anyhow::Result<()> {
        let _permit = self.permits.acquire().await?;
        let id = format!("soak-{n}");
        let root = parent
            .as_ref()
            .and_then(|parent| self.ledger.root_of.lock().ok()?.get(parent).map(|(root, _)| root.clone()))
            .unwrap_or_else(|| id.clone());
        let event = Event::SessionEstablished(SessionEstablished {
            parent_session: parent.map(SubjectId::opaque),
            ..SessionEstablished::default()
        });
        let user = SubjectId::email(format!("user{}@soak.example", n % 1000));
        self.ingest(SubjectId::session_of(SubjectId::opaque(&id), Some(user)), event).await?;
        if let Ok(mut roots) = self.ledger.root_of.lock() {
            roots.insert(id.clone(), (root, self.ledger.now_ms()));
        }
        let first = (n as usize) % self.streams.len();
        self.touch(first, &id).await?;
        self.touch((first + 1) % self.streams.len(), &id).await?;
        self.established.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn revoke(&self, root: String) -> anyhow::Result<()> {
        let _permit = self.permits.acquire().await?;
        if let Ok(mut revoked) = self.ledger.revoked_at.lock() {
            revoked.insert(root.clone(), self.ledger.now_ms());
        }
        let event = Event::SessionRevoked(SessionRevoked::default());
        self.ingest(SubjectId::session_of(SubjectId::opaque(&root), None), event).await?;
        self.revoked.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// The session id a hub SET names (read without verification: counting only).
fn session_of(token: &[u8]) -> Option<String> {
    use base64::Engine;
    let text = std::str::from_utf8(token).ok()?.trim();
    let payload = text.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    claims["sub_id"]["session"]["id"].as_str().map(str::to_owned)
}

/// Runs the soak against `hub` (started with [`hub_env`]), handing each
/// sample to `on_sample` as it is taken; returns them all.
///
/// # Errors
///
/// When the hub cannot be set up or stops answering.
pub async fn run(
    config: &SoakConfig,
    hub: &SpawnedHub,
    mut on_sample: impl FnMut(&Sample),
) -> anyhow::Result<Vec<Sample>> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(64).build()?;
    let url = hub.url();
    let admin = hub.admin_token().to_owned();
    let key = SigningKey::generate(Algorithm::Es256)?;
    let idp = "https://idp.soak.example".to_owned();
    let jwks = Jwks::from_keys([&key]).to_json();
    admin_post(&client, &url, &admin, "/admin/issuers", json!({"issuer": idp, "jwks": jwks})).await?;
    let ledger = Arc::new(Ledger {
        epoch: Instant::now(),
        root_of: Mutex::new(HashMap::new()),
        revoked_at: Mutex::new(HashMap::new()),
        latencies_ms: Mutex::new(Vec::new()),
    });
    let mut streams = Vec::new();
    for index in 0..config.receivers.max(2) {
        streams.push(start_receiver(index, &client, &url, &admin, Arc::clone(&ledger)).await?);
    }
    let soak = Arc::new(Soak {
        client,
        hub: url,
        idp,
        key,
        streams,
        ledger,
        established: AtomicU64::new(0),
        revoked: AtomicU64::new(0),
        permits: Semaphore::new(config.concurrency.max(1)),
    });
    let workload = tokio::spawn(workload(Arc::clone(&soak), config.clone()));
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(config.interval);
    tick.tick().await;
    let started = Instant::now();
    while started.elapsed() < config.duration {
        tick.tick().await;
        let sample = sample(&soak, hub, started).await?;
        on_sample(&sample);
        samples.push(sample);
        soak.ledger.forget_older_than(600_000.0);
    }
    workload.abort();
    Ok(samples)
}

async fn admin_post(
    client: &reqwest::Client,
    url: &str,
    admin: &str,
    path: &str,
    body: Value,
) -> anyhow::Result<Value> {
    let response = client.post(format!("{url}{path}")).bearer_auth(admin).json(&body).send().await?;
    anyhow::ensure!(response.status().is_success(), "POST {path} answered {}", response.status());
    Ok(response.json().await?)
}

/// A push receiver on loopback that notes each SET's arrival and answers 202.
async fn start_receiver(
    index: usize,
    client: &reqwest::Client,
    url: &str,
    admin: &str,
    ledger: Arc<Ledger>,
) -> anyhow::Result<(String, String)> {
    let audience = format!("https://rp{index}.soak.example");
    let created = admin_post(
        client,
        url,
        admin,
        "/admin/receivers",
        json!({"name": format!("soak rp{index}"), "audience": audience}),
    )
    .await?;
    let token = created["token"].as_str().context("receiver token")?.to_owned();
    let app = axum::Router::new().route(
        "/",
        axum::routing::post(move |body: Bytes| {
            let ledger = Arc::clone(&ledger);
            async move {
                ledger.arrived(&body);
                StatusCode::ACCEPTED
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}/", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    let stream = json!({"delivery": {"method": "urn:ietf:rfc:8935", "endpoint_url": endpoint},
        "events_requested": ["https://schemas.openid.net/secevent/caep/event-type/session-revoked"]});
    let response = client.post(format!("{url}/ssf/streams")).bearer_auth(&token).json(&stream).send().await?;
    anyhow::ensure!(response.status().is_success(), "creating a stream answered {}", response.status());
    let config: Value = response.json().await?;
    let stream_id = config["stream_id"].as_str().context("stream_id")?.to_owned();
    Ok((token, stream_id))
}

/// Establishes `rate` sessions a second for ever; revokes a share of the
/// roots 5 to 15 s after their birth.
async fn workload(soak: Arc<Soak>, config: SoakConfig) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / config.rate.max(0.01)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut recent: VecDeque<String> = VecDeque::new();
    let mut to_revoke: VecDeque<(Instant, String)> = VecDeque::new();
    let revoke_every = if config.revoke_share > 0.0 { (1.0 / config.revoke_share).round() as u64 } else { 0 };
    for n in 0u64.. {
        tick.tick().await;
        // A quarter are sub-agents of a recent session.
        let parent = if n % 4 == 3 { recent.get((n as usize * 7) % recent.len().max(1)).cloned() } else { None };
        let id = format!("soak-{n}");
        if parent.is_none() {
            if revoke_every > 0 && n % revoke_every == 0 {
                to_revoke.push_back((Instant::now() + Duration::from_secs(5 + n % 11), id.clone()));
            }
            recent.push_back(id);
            if recent.len() > 64 {
                recent.pop_front();
            }
        }
        let this = Arc::clone(&soak);
        tokio::spawn(async move {
            if let Err(error) = this.session(n, parent).await {
                tracing::warn!(%error, "soak session failed");
            }
        });
        while to_revoke.front().is_some_and(|(at, _)| *at <= Instant::now()) {
            let Some((_, root)) = to_revoke.pop_front() else { break };
            let this = Arc::clone(&soak);
            tokio::spawn(async move {
                if let Err(error) = this.revoke(root).await {
                    tracing::warn!(%error, "soak revocation failed");
                }
            });
        }
    }
}

async fn sample(soak: &Soak, hub: &SpawnedHub, started: Instant) -> anyhow::Result<Sample> {
    let metrics =
        soak.client.get(format!("{}/metrics", soak.hub)).bearer_auth(hub.admin_token()).send().await?.text().await?;
    let gauge = |name: &str| -> u64 {
        metrics
            .lines()
            .find(|line| line.split([' ', '{']).next() == Some(name))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|value| value.parse::<f64>().ok())
            .map_or(0, |value| value as u64)
    };
    let mut pruned = HashMap::new();
    for line in metrics.lines().filter(|line| line.starts_with("caep_pruned_total{")) {
        let kind = line.split('"').nth(1).unwrap_or_default().to_owned();
        let value = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        pruned.insert(kind, value as u64);
    }
    let latencies = soak.ledger.take_latencies();
    let percentiles = Percentiles::of(&latencies);
    Ok(Sample {
        t_s: started.elapsed().as_secs_f64(),
        established_total: soak.established.load(Ordering::Relaxed),
        revoked_total: soak.revoked.load(Ordering::Relaxed),
        live_sessions: gauge("caep_graph_sessions"),
        cascades_kept: gauge("caep_cascades_kept"),
        db_bytes: std::fs::metadata(hub.database_path()).map(|m| m.len()).unwrap_or(0),
        rss_bytes: hub.pid().map_or(0, rss_bytes),
        leaves: latencies.len(),
        leaf_p50_ms: percentiles.p50,
        leaf_p99_ms: percentiles.p99,
        pruned,
    })
}

/// A process's resident set size, from `/proc/<pid>/status`.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The soak's summary: medians by thirds of the run, and the growth over the last third.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The run by thirds.
    pub thirds: Vec<Third>,
    /// Growth from the start to the end of the last third (median of its first and last quarter).
    pub db_growth_last_third: f64,
    /// The same for the hub's RSS.
    pub rss_growth_last_third: f64,
    /// redb bytes per session kept, at the end.
    pub bytes_per_live_session: f64,
    /// Sessions established in the run.
    pub established_total: u64,
    /// Root sessions revoked in the run.
    pub revoked_total: u64,
}

/// Medians of one third of the samples.
#[derive(Debug, Clone, Serialize)]
pub struct Third {
    /// First sample's time (s).
    pub from_s: f64,
    /// Last sample's time (s).
    pub to_s: f64,
    /// Sessions kept.
    pub live_sessions: f64,
    /// redb file, MB.
    pub db_mb: f64,
    /// Hub RSS, MB.
    pub rss_mb: f64,
    /// Leaf latency p99 of the samples' intervals, ms.
    pub leaf_p99_ms: f64,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Summarizes samples (at least three).
pub fn summarize(samples: &[Sample]) -> Option<Summary> {
    if samples.len() < 3 {
        return None;
    }
    let n = samples.len();
    let thirds: Vec<Third> = [0..n / 3, n / 3..2 * n / 3, 2 * n / 3..n]
        .into_iter()
        .map(|range| {
            let part = &samples[range];
            let of = |f: &dyn Fn(&Sample) -> f64| median(part.iter().map(f).collect());
            Third {
                from_s: part.first().map_or(0.0, |s| s.t_s),
                to_s: part.last().map_or(0.0, |s| s.t_s),
                live_sessions: of(&|s| s.live_sessions as f64),
                db_mb: of(&|s| s.db_bytes as f64 / 1e6),
                rss_mb: of(&|s| s.rss_bytes as f64 / 1e6),
                leaf_p99_ms: of(&|s| if s.leaves > 0 { s.leaf_p99_ms } else { f64::NAN }),
            }
        })
        .collect();
    let last = &samples[2 * n / 3..];
    let quarter = (last.len() / 4).max(1);
    let growth = |f: &dyn Fn(&Sample) -> f64| {
        let start = median(last[..quarter].iter().map(f).collect());
        let end = median(last[last.len() - quarter..].iter().map(f).collect());
        if start > 0.0 { (end - start) / start } else { 0.0 }
    };
    let end = &samples[n - 1];
    Some(Summary {
        thirds,
        db_growth_last_third: growth(&|s| s.db_bytes as f64),
        rss_growth_last_third: growth(&|s| s.rss_bytes as f64),
        bytes_per_live_session: end.db_bytes as f64 / (end.live_sessions.max(1) as f64),
        established_total: end.established_total,
        revoked_total: end.revoked_total,
    })
}

/// Plots redb file size and RSS over time (SVG).
///
/// # Errors
///
/// When there is nothing to plot or the file cannot be written.
pub fn plot(path: &Path, samples: &[Sample], title: &str) -> anyhow::Result<()> {
    use plotters::prelude::*;
    anyhow::ensure!(!samples.is_empty(), "no samples to plot");
    let minutes = |s: &Sample| s.t_s / 60.0;
    let x_max = samples.iter().map(minutes).fold(1.0, f64::max);
    let y_max = samples.iter().map(|s| (s.db_bytes.max(s.rss_bytes)) as f64 / 1e6).fold(1.0, f64::max) * 1.15;
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    let error = |e: &dyn std::fmt::Display| anyhow::anyhow!("plot: {e}");
    root.fill(&WHITE).map_err(|e| error(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| error(&e))?;
    chart.configure_mesh().x_desc("minutes").y_desc("MB").draw().map_err(|e| error(&e))?;
    let db: Vec<u64> = samples.iter().map(|s| s.db_bytes).collect();
    let rss: Vec<u64> = samples.iter().map(|s| s.rss_bytes).collect();
    for (name, color, values) in [("redb file", BLUE, db), ("hub RSS", RED, rss)] {
        let points: Vec<(f64, f64)> =
            samples.iter().zip(values).map(|(s, value)| (minutes(s), value as f64 / 1e6)).collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|e| error(&e))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(|e| error(&e))?;
    root.present().map_err(|e| error(&e))?;
    Ok(())
}
