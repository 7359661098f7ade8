//! The simulated agents calling the relying parties they touch. Each
//! (session, receiver) pair is one agent with an access token for that RP:
//! signed by the IdP (`typ: at+jwt`), naming its session in `sid`, its user
//! in `sub`/`email`, and the sessions it was spawned under as the nested
//! `act` chain of RFC 8693 §4.1.
//!
//! During a cascade the agents keep calling. The drill is the measuring
//! instrument here, not the system under test, so it spends its requests
//! where the measurement is:
//! - an agent whose RP just acknowledged its SET calls that RP at once
//!   (ahead of every other call): the strictest test that the RP refuses
//!   from the acknowledgement on, and the bound on its refusal latency;
//! - agents of the cascade in progress that were not refused yet are called
//!   as fast as the probe workers go (each at most every [`HOT_EVERY`], all
//!   together at most [`BLIND_RATE`] calls per second): they
//!   catch refusals that come before the agent's own SET (an actor in its
//!   `act` chain revoked, or its user disabled);
//! - every other agent is called in a slow rotation, and swept once after
//!   each cascade, to catch false refusals.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use caep_schemas::jose::SigningKey;
use serde_json::{Map, Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::forest::LeafKey;
use crate::refusals::{Answer, RefusalOutcome, Refusals};

/// Shortest gap between two calls of an agent whose cascade is in progress.
pub const HOT_EVERY: Duration = Duration::from_millis(2);
/// Calls per second of the slow rotation over all other agents.
const COLD_RATE: f64 = 500.0;
/// Calls per second, at most, of all the workers together, not counting the
/// calls right after an acknowledgement: the drill must not starve the hub.
const BLIND_RATE: f64 = 4_000.0;
/// Lifetime of the agents' access tokens.
const TOKEN_LIFETIME_SECS: i64 = 3600;

/// A runtime of its own for agent traffic (the agents' calls and the RPs'
/// services), so that calls do not queue behind the thousands of SETs the
/// drill's receivers take in the same process: deployed, each RP is a
/// process of its own.
pub struct TrafficRuntime(Option<tokio::runtime::Runtime>);

impl TrafficRuntime {
    /// Two worker threads.
    ///
    /// # Errors
    ///
    /// When the runtime cannot be built.
    pub fn new() -> anyhow::Result<TrafficRuntime> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("agent-traffic")
            .enable_all()
            .build()
            .context("the agents' runtime")?;
        Ok(TrafficRuntime(Some(runtime)))
    }

    /// Where to spawn agent traffic.
    pub fn handle(&self) -> tokio::runtime::Handle {
        match &self.0 {
            Some(runtime) => runtime.handle().clone(),
            None => tokio::runtime::Handle::current(),
        }
    }
}

impl Drop for TrafficRuntime {
    fn drop(&mut self) {
        // Dropping a runtime inside another one would block; let it wind down.
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// One agent's access token for one RP.
pub struct TokenClaims<'a> {
    /// The IdP.
    pub issuer: &'a str,
    /// The RP.
    pub audience: &'a str,
    /// The agent's session.
    pub session: &'a str,
    /// The user's e-mail.
    pub email: &'a str,
    /// The sessions it was spawned under, nearest first.
    pub actors: &'a [String],
}

/// Signs an access token for `claims`.
///
/// # Errors
///
/// When signing fails.
pub fn mint(key: &SigningKey, claims: &TokenClaims<'_>) -> anyhow::Result<String> {
    let now = caep_schemas::set::now_secs();
    // The innermost actor is the farthest ancestor: build the chain from it.
    let mut act: Option<Value> = None;
    for actor in claims.actors.iter().rev() {
        let mut level = json!({"sub": format!("agent:{actor}"), "sid": actor});
        if let Some(inner) = act.take() {
            level["act"] = inner;
        }
        act = Some(level);
    }
    let mut payload = Map::new();
    payload.insert("iss".into(), json!(claims.issuer));
    payload.insert("sub".into(), json!(claims.email));
    payload.insert("email".into(), json!(claims.email));
    payload.insert("aud".into(), json!(claims.audience));
    payload.insert("sid".into(), json!(claims.session));
    payload.insert("iat".into(), json!(now));
    payload.insert("exp".into(), json!(now + TOKEN_LIFETIME_SECS));
    if let Some(act) = act {
        payload.insert("act".into(), act);
    }
    key.sign("at+jwt", &payload).context("signing an agent token")
}

/// One agent at one RP.
pub struct Target {
    /// Which pair it is.
    pub pair: LeafKey,
    /// The RP's resource URL.
    pub url: String,
    /// `Bearer <token>`.
    pub authorization: String,
}

/// When each agent is called next: agents of the cascade in progress
/// ("hot") before every other, so a backlog of the slow rotation never
/// delays a measurement.
struct Schedule {
    /// (due in µs on the drill's clock, pair, generation), per class.
    hot_queue: BinaryHeap<Reverse<(u64, usize, u32)>>,
    cold_queue: BinaryHeap<Reverse<(u64, usize, u32)>>,
    generation: Vec<u32>,
    hot: Vec<bool>,
}

impl Schedule {
    fn push(&mut self, due_us: u64, pair: usize) {
        self.generation[pair] = self.generation[pair].wrapping_add(1);
        let entry = Reverse((due_us, pair, self.generation[pair]));
        if self.hot[pair] { self.hot_queue.push(entry) } else { self.cold_queue.push(entry) }
    }

    /// The earliest live entry of a queue, left in place.
    fn head(queue: &mut BinaryHeap<Reverse<(u64, usize, u32)>>, generation: &[u32]) -> Option<(u64, usize)> {
        while let Some(&Reverse((due, pair, g))) = queue.peek() {
            if generation[pair] == g {
                return Some((due, pair));
            }
            queue.pop();
        }
        None
    }

    /// The agent to call now (taken off the schedule), or how long to wait.
    /// An entry due at 0 is a call right after an acknowledgement.
    fn next(&mut self, now_us: u64) -> Result<(usize, bool), Duration> {
        let hot = Self::head(&mut self.hot_queue, &self.generation);
        let cold = Self::head(&mut self.cold_queue, &self.generation);
        let take = |queue: &mut BinaryHeap<Reverse<(u64, usize, u32)>>, pair, due| {
            queue.pop();
            Ok((pair, due == 0))
        };
        match (hot, cold) {
            (Some((due, pair)), _) if due <= now_us => take(&mut self.hot_queue, pair, due),
            (_, Some((due, pair))) if due <= now_us => take(&mut self.cold_queue, pair, due),
            (hot, cold) => {
                let due = [hot, cold].into_iter().flatten().map(|(due, _)| due).min();
                Err(due.map_or(Duration::from_millis(5), |due| Duration::from_micros((due - now_us).min(2_000))))
            }
        }
    }
}

struct Shared {
    targets: Vec<Target>,
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
    epoch: Instant,
    refusals: Mutex<Refusals>,
    schedule: Mutex<Schedule>,
    cold_every: Duration,
    stop: AtomicBool,
}

/// The agents of a drill.
#[derive(Clone)]
pub struct Agents {
    shared: Arc<Shared>,
}

impl Agents {
    /// Agents for `targets`, on the drill's clock `epoch`, calling from `runtime`.
    pub fn new(targets: Vec<Target>, epoch: Instant, runtime: tokio::runtime::Handle) -> Agents {
        let client = reqwest::Client::builder().pool_max_idle_per_host(16).build().unwrap_or_default();
        let n = targets.len();
        let refusals = Refusals::new(targets.iter().map(|t| t.pair.clone()).collect());
        let cold_every = Duration::from_secs_f64((n as f64 / COLD_RATE).max(0.02));
        let schedule = Schedule {
            hot_queue: BinaryHeap::new(),
            cold_queue: BinaryHeap::new(),
            generation: vec![0; n],
            hot: vec![false; n],
        };
        let shared = Shared {
            targets,
            client,
            runtime,
            epoch,
            refusals: Mutex::new(refusals),
            schedule: Mutex::new(schedule),
            cold_every,
            stop: AtomicBool::new(false),
        };
        Agents { shared: Arc::new(shared) }
    }

    /// Number of agents.
    pub fn len(&self) -> usize {
        self.shared.targets.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.shared.targets.is_empty()
    }

    fn now_ms(&self) -> f64 {
        self.shared.epoch.elapsed().as_secs_f64() * 1000.0
    }

    fn refusals(&self) -> std::sync::MutexGuard<'_, Refusals> {
        self.shared.refusals.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One call of agent `pair`, recorded.
    pub async fn call(&self, pair: usize) -> Answer {
        let Some(target) = self.shared.targets.get(pair) else { return Answer::Failed };
        let sent = self.now_ms();
        let answer = match self
            .shared
            .client
            .get(&target.url)
            .header("authorization", &target.authorization)
            .timeout(Duration::from_secs(10))
            .send()
            .await
        {
            Ok(response) if response.status().is_success() => Answer::Accepted,
            Ok(response) if response.status().as_u16() == 401 && is_revocation(&response) => Answer::Refused,
            Ok(response) => {
                tracing::warn!(status = %response.status(), url = target.url, "an RP failed an agent");
                Answer::Failed
            }
            Err(error) => {
                tracing::warn!(%error, url = target.url, "an agent's call failed");
                Answer::Failed
            }
        };
        let done = self.now_ms();
        tracing::debug!(pair, receiver = target.pair.receiver, sent, done, ?answer, "agent call");
        self.refusals().record(pair, sent, done, answer);
        answer
    }

    /// Calls each of `pairs` once, `concurrency` at a time.
    pub async fn sweep(&self, pairs: &[usize], concurrency: usize) {
        let permits = Arc::new(Semaphore::new(concurrency.max(1)));
        let mut calls = JoinSet::new();
        for &pair in pairs {
            let (agents, permits) = (self.clone(), Arc::clone(&permits));
            let runtime = self.shared.runtime.clone();
            calls.spawn_on(
                async move {
                    let _permit = permits.acquire_owned().await;
                    agents.call(pair).await
                },
                &runtime,
            );
        }
        while calls.join_next().await.is_some() {}
    }

    /// Every agent's number.
    pub fn all(&self) -> Vec<usize> {
        (0..self.len()).collect()
    }

    /// A cascade revoking `leaves` was posted at `started_at_ms`: its agents
    /// are called at once and then as fast as the workers go until refused.
    /// Returns the phase number.
    pub fn revoke(&self, started_at_ms: f64, leaves: &BTreeSet<LeafKey>) -> usize {
        let phase = self.refusals().revoke(started_at_ms, leaves);
        let pairs: Vec<usize> = {
            let refusals = self.refusals();
            leaves.iter().filter_map(|leaf| refusals.index_of(leaf)).collect()
        };
        let now_us = self.shared.epoch.elapsed().as_micros() as u64;
        let mut schedule = self.shared.schedule.lock().unwrap_or_else(|p| p.into_inner());
        for pair in pairs {
            schedule.hot[pair] = true;
            schedule.push(now_us, pair);
        }
        phase
    }

    /// The RP of `pair` acknowledged its SET at `at_ms`: accepted calls
    /// sent after it are stale, and the agent calls it next, ahead of every
    /// other call.
    pub fn acknowledged(&self, pair: &LeafKey, at_ms: f64) {
        let index = {
            let mut refusals = self.refusals();
            let Some(index) = refusals.index_of(pair) else { return };
            refusals.acknowledged(index, at_ms);
            if refusals.is_refused(index) {
                return;
            }
            index
        };
        let mut schedule = self.shared.schedule.lock().unwrap_or_else(|p| p.into_inner());
        schedule.hot[index] = true;
        schedule.push(0, index);
    }

    /// Waits until every agent of `phase` was refused, or `deadline`.
    /// Returns how many were not.
    pub async fn wait_refused(&self, phase: usize, deadline: Instant) -> usize {
        loop {
            let left = self.refusals().unrefused_of(phase).len();
            if left == 0 || Instant::now() >= deadline {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Agents no cascade so far revokes.
    pub fn unaffected(&self) -> Vec<usize> {
        self.refusals().unaffected()
    }

    /// Starts `workers` probe tasks; they run until [`stop`](Self::stop).
    /// The slow rotation starts now, spread over one period.
    pub fn start_probing(&self, workers: usize) -> JoinSet<()> {
        {
            let n = self.len().max(1) as u64;
            let now_us = self.shared.epoch.elapsed().as_micros() as u64;
            let period_us = self.shared.cold_every.as_micros() as u64;
            let mut schedule = self.shared.schedule.lock().unwrap_or_else(|p| p.into_inner());
            for pair in 0..self.len() {
                if !schedule.hot[pair] {
                    schedule.push(now_us + period_us * pair as u64 / n, pair);
                }
            }
        }
        let mut tasks = JoinSet::new();
        let workers = workers.max(1);
        let pace = Duration::from_secs_f64(workers as f64 / BLIND_RATE);
        for _ in 0..workers {
            let agents = self.clone();
            tasks.spawn_on(async move { agents.probe_forever(pace).await }, &self.shared.runtime);
        }
        tasks
    }

    /// Stops the probe workers.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }

    /// One worker: calls what is due, at most one blind call per `pace`.
    async fn probe_forever(&self, pace: Duration) {
        let mut last_blind = Instant::now();
        while !self.shared.stop.load(Ordering::SeqCst) {
            let now_us = self.shared.epoch.elapsed().as_micros() as u64;
            let next = self.shared.schedule.lock().unwrap_or_else(|p| p.into_inner()).next(now_us);
            let pair = match next {
                Ok((pair, true)) => pair,
                Ok((pair, false)) => {
                    tokio::time::sleep_until((last_blind + pace).into()).await;
                    last_blind = Instant::now();
                    pair
                }
                Err(wait) => {
                    tokio::time::sleep(wait).await;
                    continue;
                }
            };
            self.call(pair).await;
            let refused = self.refusals().is_refused(pair);
            let now_us = self.shared.epoch.elapsed().as_micros() as u64;
            let mut schedule = self.shared.schedule.lock().unwrap_or_else(|p| p.into_inner());
            if refused {
                // Refused: back to the slow rotation, which still catches a later accept.
                schedule.hot[pair] = false;
            }
            let every = if schedule.hot[pair] { HOT_EVERY } else { self.shared.cold_every };
            schedule.push(now_us + every.as_micros() as u64, pair);
        }
    }

    /// What the agents saw.
    pub fn outcome(&self) -> RefusalOutcome {
        self.refusals().outcome()
    }

    /// Every refused agent's refusal latency (ms).
    pub fn latencies(&self) -> Vec<f64> {
        self.refusals().latencies()
    }
}

/// A 401 of the guard (RFC 6750 `invalid_token`, "session revoked"), not
/// the RP's own authentication.
fn is_revocation(response: &reqwest::Response) -> bool {
    response
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("error=\"invalid_token\"") && v.contains("session revoked"))
}

#[cfg(test)]
mod tests {
    use caep_receiver::guard::bearer_jwt;
    use caep_schemas::jose::Algorithm;

    use super::*;

    #[test]
    fn hot_agents_go_first_even_behind_an_overdue_rotation() {
        let mut schedule = Schedule {
            hot_queue: BinaryHeap::new(),
            cold_queue: BinaryHeap::new(),
            generation: vec![0; 3],
            hot: vec![false, false, true],
        };
        schedule.push(10, 0);
        schedule.push(20, 1);
        schedule.push(500, 2);
        assert_eq!(schedule.next(5), Err(Duration::from_micros(5)), "nothing due yet");
        assert_eq!(schedule.next(1000), Ok((2, false)), "the hot agent first");
        assert_eq!(schedule.next(1000), Ok((0, false)));
        schedule.push(2000, 0);
        // Rescheduling replaces the earlier entry.
        assert_eq!(schedule.next(1000), Ok((1, false)));
        schedule.hot[1] = true;
        schedule.push(0, 1);
        assert_eq!(schedule.next(1000), Ok((1, true)), "a call right after an acknowledgement");
        assert!(schedule.next(1000).is_err(), "agent 0 is due at 2000 only");
    }

    #[test]
    fn the_layer_reads_the_session_its_actors_and_user_from_a_minted_token() {
        let key = SigningKey::generate(Algorithm::Es256).expect("key");
        let actors = ["parent".to_owned(), "root".to_owned()];
        let claims = TokenClaims {
            issuer: "https://idp",
            audience: "https://rp",
            session: "child",
            email: "a@x",
            actors: &actors,
        };
        let token = mint(&key, &claims).expect("token");
        let mut headers = axum::http::HeaderMap::new();
        headers.insert("authorization", format!("Bearer {token}").parse().expect("header"));
        let agent = bearer_jwt("sid")(&headers).expect("an agent");
        assert_eq!(agent.sessions, ["child", "parent", "root"]);
        assert_eq!(agent.users.len(), 2, "iss/sub and email");
    }
}
