#![forbid(unsafe_code)]
//! `caep-drill`: a revocation-cascade drill against a caep-hub with real
//! receivers, faults, exactness checks, a report and a plot.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use caep_simulations::accounting::Percentiles;
use caep_simulations::cluster::{Brokers, ClusterSpec, KafkaCluster};
use caep_simulations::drill::{self, DrillConfig, DrillReport, Faults, HubTarget, Scenario};
use caep_simulations::forest::ForestParams;
use caep_simulations::guards::{Guarding, locate_guard_bin};
use caep_simulations::hub::{SpawnedHub, locate_hub_bin};
use clap::Parser;

/// Revocation-cascade drill: builds an agent forest, starts real relying
/// parties (push and poll) on loopback guarded by the SDK's layer or a
/// caep-guard sidecar, establishes every session through a simulated IdP,
/// has the agents call the RPs they touch (the guards report the touches),
/// revokes while the agents keep calling, and checks that every expected
/// leaf arrived exactly and every revoked agent was refused. Exits 1 when a
/// leaf is lost or unexpected, or on a stale accept, a false refusal or an
/// agent never refused.
#[derive(Debug, Parser)]
#[command(name = "caep-drill", version)]
struct Args {
    /// Sessions in total.
    #[arg(long, default_value_t = 200)]
    sessions: usize,
    /// Depth of each agent tree (0: roots only).
    #[arg(long, default_value_t = 3)]
    depth: usize,
    /// Sub-agents per session above the last level.
    #[arg(long, default_value_t = 4)]
    fanout: usize,
    /// Receivers (relying parties), each with one stream.
    #[arg(long, default_value_t = 8)]
    receivers: usize,
    /// Distinct receivers each session touches.
    #[arg(long, default_value_t = 3)]
    touches_per_session: usize,
    /// Relative share of delegated sessions.
    #[arg(long, default_value_t = 0.5)]
    delegated: f64,
    /// Relative share of bounded sessions.
    #[arg(long, default_value_t = 0.3)]
    bounded: f64,
    /// Relative share of autonomous sessions.
    #[arg(long, default_value_t = 0.2)]
    autonomous: f64,
    /// Users owning the trees.
    #[arg(long, default_value_t = 4)]
    users: usize,
    /// Share of receivers that poll (RFC 8936); the rest are pushed to (RFC 8935).
    #[arg(long, default_value_t = 0.25)]
    poll_share: f64,
    /// Seed of the forest.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Revocations: every root; or first a mid-tree session, a user (RISC account-disabled), or both.
    #[arg(long, value_enum, default_value_t = Scenario::All)]
    scenario: Scenario,
    /// The default fault mix: flaky, slow and down push receivers, and a hub SIGKILL at a third of the leaves.
    #[arg(long)]
    faults: bool,
    /// Push receivers that fail the first --flaky-failures times per SET (answering 503).
    #[arg(long)]
    flaky: Option<usize>,
    /// Failures per SET of a flaky receiver.
    #[arg(long, default_value_t = 2)]
    flaky_failures: u32,
    /// Push receivers that answer slowly.
    #[arg(long)]
    slow: Option<usize>,
    /// Handler delay of a slow receiver (ms).
    #[arg(long, default_value_t = 20)]
    slow_ms: u64,
    /// Push receivers down when the first revocation is posted, back after --down-ms.
    #[arg(long)]
    down: Option<usize>,
    /// How long down receivers stay down (ms).
    #[arg(long, default_value_t = 1500)]
    down_ms: u64,
    /// SIGKILL the drill's hub after this many leaves were delivered, then restart it on the same data dir and port.
    #[arg(long)]
    kill_hub_at: Option<usize>,
    /// Kafka mode: SIGKILL one instance after this many leaves were delivered (it is not restarted; the others
    /// take over its partitions).
    #[arg(long, requires = "kafka")]
    kill_instance_at: Option<usize>,
    /// Kafka mode with --kafka tansu: stop the broker after this many leaves were delivered and restart it on the
    /// same port and storage after --broker-down-ms.
    #[arg(long, requires = "kafka")]
    restart_broker_at: Option<usize>,
    /// How long the restarted broker stays down (ms).
    #[arg(long, default_value_t = 1500)]
    broker_down_ms: u64,
    /// Kafka mode: start --hubs caep-hub instances on this Kafka broker (host:port[,...]), or on a private Tansu
    /// broker the drill starts itself (`tansu`; found at $CAEP_TANSU, on PATH or in ~/.cache/caep-hub/tansu/bin).
    #[arg(long, value_name = "BROKERS|tansu", conflicts_with = "hub")]
    kafka: Option<String>,
    /// Kafka mode: hub instances, behind a round-robin balancer the drill runs.
    #[arg(long, requires = "kafka", default_value_t = 3)]
    hubs: usize,
    /// Kafka mode: partitions of the graph and deliveries topics.
    #[arg(long, requires = "kafka", default_value_t = 6)]
    partitions: usize,
    /// A setting for every hub the drill starts, as `CAEP_HUB_NAME=value` (repeatable), e.g.
    /// `--hub-env CAEP_HUB_KAFKA_LINGER_MS=1`. The settings the drill runs the hubs with win over these.
    #[arg(long = "hub-env", value_name = "CAEP_HUB_NAME=VALUE", value_parser = parse_hub_env)]
    hub_env: Vec<(String, String)>,
    /// Kafka mode: wait this long after the instances are up before the drill starts (s).
    #[arg(long, requires = "kafka", default_value_t = 0)]
    warmup_secs: u64,
    /// Drill an existing hub at this URL instead of starting one (it must allow 127.0.0.0/8 push endpoints).
    #[arg(long, requires = "admin_token")]
    hub: Option<String>,
    /// Admin token of --hub (base64url, so it may begin with `-`).
    #[arg(long, env = "CAEP_DRILL_ADMIN_TOKEN", allow_hyphen_values = true)]
    admin_token: Option<String>,
    /// The caep-hub binary to start (default: next to this executable).
    #[arg(long)]
    hub_bin: Option<PathBuf>,
    /// Guards of the RPs: the SDK's layer, caep-guard sidecars, a mix, or none (the drill reports the touches
    /// itself and no agent calls: hub-only figures). With guards the agents call the RPs they touch, the guards
    /// report the touches, and the report adds refusal latency, stale accepts and false refusals.
    #[arg(long, value_enum, default_value_t = Guarding::Mix)]
    guards: Guarding,
    /// The caep-guard binary for sidecar RPs (default: next to this executable).
    #[arg(long)]
    guard_bin: Option<PathBuf>,
    /// Agents' concurrent calls to the RPs during revocations.
    #[arg(long, default_value_t = 8)]
    probers: usize,
    /// Longest wait for one revocation's leaves (s).
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// Concurrent IdP and touch requests during setup.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the leaf-latency CDF (SVG) to this file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Benchmark preset: --runs drills of every root (no faults) on one hub; prints the medians.
    #[arg(long)]
    bench: bool,
    /// Runs of --bench.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Soak: run a constant workload for MINUTES against one hub with lifetimes of --soak-ttl-secs, sampling
    /// sessions kept, redb bytes, RSS, leaf p99 and pruning every --soak-interval-secs (JSON lines on stdout).
    #[arg(long, value_name = "MINUTES", conflicts_with_all = ["kafka", "hub", "bench"])]
    soak: Option<f64>,
    /// Soak: sessions established per second (a quarter as sub-agents; a third of the roots revoked).
    #[arg(long, requires = "soak", default_value_t = 20.0)]
    rate: f64,
    /// Soak: seconds between samples.
    #[arg(long, requires = "soak", default_value_t = 30)]
    soak_interval_secs: u64,
    /// Soak: the hub's session idle TTL, revoked, cascade and dead-letter retention (s).
    #[arg(long, requires = "soak", default_value_t = 180)]
    soak_ttl_secs: u64,
    /// Self-test: receiver 0 acknowledges but does not record its first N leaves (they must be reported lost).
    #[arg(long, default_value_t = 0, hide = true)]
    self_test_drop: usize,
    /// Self-test: N leaves are left out of the expectation (they must be reported unexpected).
    #[arg(long, default_value_t = 0, hide = true)]
    self_test_forget: usize,
    /// Self-test: receiver 0's layer is not fed its SETs (its agents must show as stale accepts, never refused).
    #[arg(long, hide = true)]
    self_test_blind: bool,
    /// Self-test: receiver 0 refuses an unaffected agent when the first cascade starts (a false refusal).
    #[arg(long, hide = true)]
    self_test_false_refusal: bool,
}

impl Args {
    fn config(&self, run_id: String) -> DrillConfig {
        let mut faults = if self.faults { Faults::default_mix(self.receivers) } else { Faults::default() };
        if let Some(n) = self.flaky {
            faults.flaky_receivers = n;
        }
        if let Some(n) = self.slow {
            faults.slow_receivers = n;
        }
        if let Some(n) = self.down {
            faults.down_receivers = n;
        }
        faults.flaky_failures = self.flaky_failures;
        faults.slow_ms = self.slow_ms;
        faults.down_ms = self.down_ms;
        faults.kill_hub_at = self.kill_hub_at;
        faults.kill_instance_at = self.kill_instance_at;
        faults.restart_broker_at = self.restart_broker_at;
        faults.broker_down_ms = self.broker_down_ms;
        DrillConfig {
            forest: ForestParams {
                sessions: self.sessions,
                depth: self.depth,
                fanout: self.fanout,
                receivers: self.receivers,
                touches_per_session: self.touches_per_session,
                authority_shares: [self.delegated, self.bounded, self.autonomous],
                users: self.users,
                seed: self.seed,
            },
            poll_share: self.poll_share,
            scenario: self.scenario,
            faults,
            kill_hub_default: self.faults,
            timeout: Duration::from_secs(self.timeout_secs),
            concurrency: self.concurrency,
            progress: !self.quiet,
            run_id,
            drop_deliveries: self.self_test_drop,
            forget_expected: self.self_test_forget,
            guarding: self.guards,
            guard_bin: None,
            probers: self.probers,
            blind_receiver: self.self_test_blind,
            false_refusal: self.self_test_false_refusal,
        }
    }
}

fn run_id(suffix: &str) -> String {
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    format!("d{}{suffix}", ms % 100_000_000)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "caep_simulations=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("caep-drill: {error}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(main_async(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("caep-drill: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// The hub under drill.
enum Hub {
    /// An existing hub (`--hub`).
    External,
    /// One `caep-hub` the drill started.
    Embedded(SpawnedHub),
    /// `--kafka`: instances on a broker, behind the drill's balancer.
    Kafka(KafkaCluster),
}

impl Hub {
    fn target(&mut self, url: &str, admin_token: &str) -> HubTarget<'_> {
        let (spawned, cluster) = match self {
            Hub::External => (None, None),
            Hub::Embedded(hub) => (Some(hub), None),
            Hub::Kafka(cluster) => (None, Some(cluster)),
        };
        HubTarget { url: url.to_owned(), admin_token: admin_token.to_owned(), spawned, cluster }
    }
}

/// Parses `--hub-env`: only the hub's own settings may be set this way.
fn parse_hub_env(arg: &str) -> Result<(String, String), String> {
    let (name, value) = arg.split_once('=').ok_or_else(|| format!("`{arg}` is not NAME=VALUE"))?;
    if !name.starts_with("CAEP_HUB_") || name.len() == "CAEP_HUB_".len() {
        return Err(format!("`{name}` is not a CAEP_HUB_* setting"));
    }
    Ok((name.to_owned(), value.to_owned()))
}

/// Ok(exact?).
async fn main_async(args: Args) -> anyhow::Result<bool> {
    let token = format!("drill-admin-{}", run_id(""));
    if let Some(minutes) = args.soak {
        return soak(&args, minutes, token).await;
    }
    let mut hub = match (&args.hub, &args.kafka) {
        (Some(_), _) => Hub::External,
        (None, None) => {
            let bin = locate_hub_bin(args.hub_bin.as_deref())?;
            Hub::Embedded(SpawnedHub::start_with_env(bin, token.clone(), args.hub_env.clone()).await?)
        }
        (None, Some(kafka)) => {
            let brokers = if kafka == "tansu" {
                Brokers::Tansu(caep_simulations::tansu::binary()?)
            } else {
                Brokers::External(kafka.clone())
            };
            let spec = ClusterSpec {
                hub_bin: locate_hub_bin(args.hub_bin.as_deref())?,
                brokers,
                instances: args.hubs,
                partitions: args.partitions,
                extra_env: args.hub_env.clone(),
                admin_token: token.clone(),
            };
            if !args.quiet {
                eprintln!("caep-drill: starting {} caep-hub instance(s) in Kafka mode on {kafka}", args.hubs);
            }
            let cluster = KafkaCluster::start(&spec).await?;
            tokio::time::sleep(Duration::from_secs(args.warmup_secs)).await;
            Hub::Kafka(cluster)
        }
    };
    let (url, admin_token) = match &hub {
        Hub::External => (
            args.hub.as_deref().unwrap_or_default().trim_end_matches('/').to_owned(),
            args.admin_token.clone().unwrap_or_default(),
        ),
        Hub::Embedded(spawned) => (spawned.url(), token),
        Hub::Kafka(cluster) => (cluster.url(), token),
    };
    let exact = if args.bench {
        bench(&args, &url, &admin_token, &mut hub).await?
    } else {
        let mut config = args.config(run_id(""));
        if matches!(args.guards, Guarding::Sidecar | Guarding::Mix) {
            config.guard_bin = Some(locate_guard_bin(args.guard_bin.as_deref())?);
        }
        let report = drill::run(&config, hub.target(&url, &admin_token)).await?;
        let kafka = match &hub {
            Hub::Kafka(cluster) => Some(cluster.brokers().to_owned()),
            _ => None,
        };
        print_summary(&report, &url, kafka.as_deref());
        if let Some(path) = &args.json {
            let text = serde_json::to_string_pretty(&report.to_json())?;
            std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        }
        if let Some(path) = &args.plot {
            let title = format!(
                "caep-drill: {} leaves ({} sessions × {} receivers){}{}",
                report.outcome.delivered_leaves,
                report.sessions,
                report.receivers,
                report.instances.as_ref().map_or_else(String::new, |i| format!(", {} instances on Kafka", i.len())),
                if report.faults.any() { ", with faults" } else { "" }
            );
            let mut series = vec![("leaf delivery", report.latencies.as_slice())];
            if report.refusal.is_some() {
                series.push(("refusal at the RP", report.refusal_latencies.as_slice()));
            }
            caep_simulations::plot::latency_cdf(path, &series, &title)?;
        }
        report.passed()
    };
    if !exact && let Hub::Kafka(cluster) = &mut hub {
        eprintln!("caep-drill: not exact; instance and broker logs kept in {:?}", cluster.keep_logs());
    }
    Ok(exact)
}

fn print_summary(report: &DrillReport, url: &str, kafka: Option<&str>) {
    let o = &report.outcome;
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0} ms"));
    println!();
    match (&report.instances, kafka) {
        (Some(requests), Some(brokers)) => {
            let spread: Vec<String> = requests.iter().map(u64::to_string).collect();
            println!("caep-drill against {} caep-hub instances on Kafka ({brokers}) behind {url}", requests.len());
            println!("  requests per instance (round robin): {}", spread.join(" / "));
        }
        _ => println!("caep-drill against {url}"),
    }
    println!(
        "  forest: {} sessions, {} receivers ({} poll), {} touches; setup {:.1} s (establishing {:.1} s, touching {:.1} s)",
        report.sessions,
        report.receivers,
        report.poll_receivers,
        report.touches,
        report.setup_ms / 1000.0,
        report.establish_ms / 1000.0,
        report.touch_ms / 1000.0
    );
    if report.faults.any() {
        let f = &report.faults;
        let at = |n: Option<usize>| n.map_or_else(|| "-".to_owned(), |n| format!("{n} leaves"));
        if report.instances.is_some() {
            println!(
                "  Kafka faults: instance SIGKILL at {} → {} kill(s){}; broker restart at {} ({} ms down) → {} restart(s){}",
                at(f.kill_instance_at),
                report.instance_kills,
                report.instance_killed_after.map_or_else(String::new, |n| format!(" after {n} leaves")),
                at(f.restart_broker_at),
                f.broker_down_ms,
                report.broker_restarts,
                report.broker_stopped_after.map_or_else(String::new, |n| format!(" after {n} leaves"))
            );
        }
        let receiver_faults = f.flaky_receivers + f.slow_receivers + f.down_receivers > 0;
        if receiver_faults || f.kill_hub_at.is_some() {
            println!(
                "  faults: {} flaky (×{}), {} slow ({} ms), {} down ({} ms), hub SIGKILL at {} → {} kill(s)",
                f.flaky_receivers,
                f.flaky_failures,
                f.slow_receivers,
                f.slow_ms,
                f.down_receivers,
                f.down_ms,
                at(f.kill_hub_at),
                report.hub_kills
            );
        }
    }
    println!();
    let p99 = |p: Option<Percentiles>| p.map_or_else(|| "-".to_owned(), |p| format!("{:.0} ms", p.p99));
    println!(
        "  {:<8} {:<24} {:>9} {:>14} {:>12} {:>12} {:>14}",
        "phase", "txn", "leaves", "hub cascade", "drill wall", "leaf p99", "refusal p99"
    );
    for phase in &report.phases {
        println!(
            "  {:<8} {:<24} {:>9} {:>14} {:>12} {:>12} {:>14}",
            phase.name,
            phase.txn,
            phase.expected_leaves,
            ms(phase.hub_cascade_ms),
            format!("{:.0} ms", phase.wall_ms),
            p99(Some(phase.delivery_ms)),
            p99(phase.refusal_ms)
        );
    }
    println!();
    let spread =
        |p: &Percentiles| format!("p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms", p.p50, p.p90, p.p99, p.max);
    let mut rows: Vec<(&str, String)> = vec![
        ("expected leaves", o.expected_leaves.to_string()),
        ("delivered leaves", o.delivered_leaves.to_string()),
        ("lost leaves", o.lost_leaves.to_string()),
        ("unexpected leaves", o.unexpected_leaves.to_string()),
        (
            "duplicate deliveries",
            format!("{} ({} retries of an acknowledged jti)", o.duplicate_deliveries, o.retried_jtis),
        ),
        ("wrong txn", o.wrong_txn.to_string()),
        ("leaf latency", spread(&o.latency_ms)),
        ("cascade (roots, hub)", ms(report.cascade_ms)),
        ("throughput", format!("{:.0} SETs/s", report.sets_per_second)),
        ("hub restarts", report.hub_kills.to_string()),
        ("instances killed", report.instance_kills.to_string()),
        ("broker restarts", report.broker_restarts.to_string()),
    ];
    if let Some(r) = &report.refusal {
        let (layer, sidecar) = report.guards;
        rows.extend([
            ("guards", format!("{layer} layer, {sidecar} caep-guard sidecar")),
            (
                "agent calls",
                format!("{} ({} served, {} refused, {} failed)", r.requests, r.accepted, r.refused, r.failed),
            ),
            ("refusal latency", spread(&r.latency_ms)),
            ("stale accepts", r.stale_accepts.to_string()),
            ("false refusals", r.false_refusals.to_string()),
            ("never refused", r.never_refused.to_string()),
        ]);
    }
    let cpu = |spent: &caep_simulations::cpu::CpuSpent, per: &str| match (spent.hub_total_s, spent.hub_per_op_us) {
        (Some(total), Some(per_op)) => {
            let instances = if spent.hubs_s.len() > 1 {
                let each: Vec<String> =
                    spent.hubs_s.iter().map(|s| s.map_or("-".into(), |s| format!("{s:.2}"))).collect();
                format!(" ({} s per instance)", each.join(" / "))
            } else {
                String::new()
            };
            let broker = spent.broker_s.map_or_else(String::new, |s| format!("; broker {s:.2} s"));
            format!("{total:.2} s, {per_op:.0} µs per {per}{instances}{broker}")
        }
        _ => "- (a hub not started by the drill, or restarted)".to_owned(),
    };
    rows.push(("hub CPU, setup", cpu(&report.cpu_setup, "establish or touch")));
    rows.push(("hub CPU, revocations", cpu(&report.cpu_revocations, "leaf")));
    let ops = report.sessions + report.touches;
    let broker = |spent: &caep_simulations::counters::CountersSpent, ops: usize, per: &str| {
        spent.broker_requests_per_op.map(|per_op| format!("{per_op:.2} per {per} ({})", spent.top_requests(ops, 4)))
    };
    if let Some(row) = broker(&report.counters_setup, ops, "establish or touch") {
        rows.push(("broker requests, setup", row));
    }
    if let Some(row) = broker(&report.counters_revocations, report.outcome.delivered_leaves, "leaf") {
        rows.push(("broker requests, revocations", row));
    }
    let signed = &report.counters_revocations.leaves_signed;
    if signed.len() > 1 {
        let each: Vec<String> = signed.iter().map(|n| n.map_or("-".into(), |n| n.to_string())).collect();
        rows.push(("leaves signed per instance", each.join(" / ")));
    }
    rows.push(("verdict", if report.passed() { "EXACT".to_owned() } else { "FAILED".to_owned() }));
    for (name, value) in rows {
        println!("  {name:<22} {value}");
    }
    for leaf in &o.lost_sample {
        println!("  lost: receiver {} session {}", leaf.receiver, leaf.session);
    }
    for leaf in &o.unexpected_sample {
        println!("  unexpected: receiver {} session {}", leaf.receiver, leaf.session);
    }
    for incident in report.refusal.iter().flat_map(|r| &r.stale_sample) {
        println!(
            "  stale accept: receiver {} session {} at {:.0} ms",
            incident.receiver, incident.session, incident.sent_at_ms
        );
    }
    for incident in report.refusal.iter().flat_map(|r| &r.false_sample) {
        println!(
            "  false refusal: receiver {} session {} at {:.0} ms",
            incident.receiver, incident.session, incident.sent_at_ms
        );
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

async fn bench(args: &Args, url: &str, admin_token: &str, hub: &mut Hub) -> anyhow::Result<bool> {
    let runs = args.runs.max(1);
    let on = match hub {
        Hub::Kafka(cluster) => format!(" on {} instance(s) on Kafka ({})", cluster.instances(), cluster.brokers()),
        _ => String::new(),
    };
    println!(
        "caep-drill --bench: {runs} runs of {} sessions × {} receivers ({:.0}% poll), every root revoked{on}",
        args.sessions,
        args.receivers,
        args.poll_share * 100.0
    );
    let (mut cascade, mut p50, mut p99, mut rate) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut costs = BenchCosts::default();
    let mut exact = true;
    for run in 0..runs {
        let mut config = args.config(run_id(&format!("b{run}")));
        config.scenario = Scenario::Roots;
        // Hub-only figures: no agents calling RPs beside the cascade.
        config.guarding = Guarding::None;
        config.faults = Faults::default();
        config.kill_hub_default = false;
        let report = drill::run(&config, hub.target(url, admin_token)).await?;
        let o = &report.outcome;
        exact &= o.is_exact();
        let c = report.cascade_ms.or(report.phases.last().map(|p| p.wall_ms)).unwrap_or(f64::NAN);
        println!(
            "run {}: {} leaves, lost {}, unexpected {}; cascade {c:.0} ms, leaf p50 {:.0} ms, p99 {:.0} ms, {:.0} SETs/s",
            run + 1,
            o.delivered_leaves,
            o.lost_leaves,
            o.unexpected_leaves,
            o.latency_ms.p50,
            o.latency_ms.p99,
            report.sets_per_second
        );
        costs.add(&report);
        cascade.push(c);
        p50.push(o.latency_ms.p50);
        p99.push(o.latency_ms.p99);
        rate.push(report.sets_per_second);
    }
    println!(
        "median of {runs}: cascade {:.0} ms, leaf p50 {:.0} ms, leaf p99 {:.0} ms, {:.0} SETs/s",
        median(cascade),
        median(p50),
        median(p99),
        median(rate)
    );
    costs.print(runs);
    Ok(exact)
}

/// What each bench run cost: setup rate, CPU and broker requests.
#[derive(Default)]
struct BenchCosts {
    setup_ops_per_s: Vec<f64>,
    setup_cpu_us: Vec<f64>,
    leaf_cpu_us: Vec<f64>,
    setup_broker_cpu_s: Vec<f64>,
    revocation_broker_cpu_s: Vec<f64>,
    setup_requests: Vec<f64>,
    leaf_requests: Vec<f64>,
}

impl BenchCosts {
    fn add(&mut self, report: &drill::DrillReport) {
        let ops = (report.sessions + report.touches) as f64;
        let setup_s = (report.establish_ms + report.touch_ms) / 1000.0;
        if setup_s > 0.0 {
            self.setup_ops_per_s.push(ops / setup_s);
        }
        self.setup_cpu_us.extend(report.cpu_setup.hub_per_op_us);
        self.leaf_cpu_us.extend(report.cpu_revocations.hub_per_op_us);
        self.setup_broker_cpu_s.extend(report.cpu_setup.broker_s);
        self.revocation_broker_cpu_s.extend(report.cpu_revocations.broker_s);
        self.setup_requests.extend(report.counters_setup.broker_requests_per_op);
        self.leaf_requests.extend(report.counters_revocations.broker_requests_per_op);
    }

    fn print(self, runs: usize) {
        let m = |values: Vec<f64>, digits: usize| {
            if values.is_empty() { "-".to_owned() } else { format!("{:.digits$}", median(values)) }
        };
        println!(
            "median of {runs}: setup {} establish-or-touch/s; hub CPU {} µs per establish or touch, {} µs per leaf",
            m(self.setup_ops_per_s, 0),
            m(self.setup_cpu_us, 0),
            m(self.leaf_cpu_us, 0)
        );
        if !self.setup_requests.is_empty() || !self.setup_broker_cpu_s.is_empty() {
            println!(
                "median of {runs}: broker requests {} per establish or touch, {} per leaf; broker CPU {} s in setup, {} s in revocations",
                m(self.setup_requests, 2),
                m(self.leaf_requests, 2),
                m(self.setup_broker_cpu_s, 2),
                m(self.revocation_broker_cpu_s, 2)
            );
        }
    }
}

/// `--soak`: a constant workload against one hub; JSON lines, a summary
/// by thirds of the run, and optionally the samples (`--json`) and a plot
/// of bytes and RSS (`--plot`). Ok(true) unless nothing could be sampled.
async fn soak(args: &Args, minutes: f64, token: String) -> anyhow::Result<bool> {
    use caep_simulations::soak::{self, SoakConfig};
    let bin = locate_hub_bin(args.hub_bin.as_deref())?;
    let hub = SpawnedHub::start_with_env(bin, token, soak::hub_env(args.soak_ttl_secs)).await?;
    let config = SoakConfig {
        duration: Duration::from_secs_f64(minutes * 60.0),
        rate: args.rate,
        interval: Duration::from_secs(args.soak_interval_secs.max(1)),
        receivers: args.receivers,
        revoke_share: 1.0 / 3.0,
        concurrency: args.concurrency,
    };
    eprintln!(
        "caep-drill: soak for {minutes} min at {} sessions/s, lifetimes {} s, sampling every {} s",
        args.rate, args.soak_ttl_secs, args.soak_interval_secs
    );
    // One JSON line per sample on stdout, as it is taken.
    let samples = soak::run(&config, &hub, |sample| {
        println!("{}", serde_json::to_string(sample).unwrap_or_default());
    })
    .await?;
    let Some(summary) = soak::summarize(&samples) else {
        eprintln!("caep-drill: too few samples for a summary");
        return Ok(false);
    };
    eprintln!("\n| part of the run | sessions kept | redb MB | RSS MB | leaf p99 ms |");
    eprintln!("|---|---:|---:|---:|---:|");
    for third in &summary.thirds {
        eprintln!(
            "| {:.0}–{:.0} min | {:.0} | {:.1} | {:.1} | {:.0} |",
            third.from_s / 60.0,
            third.to_s / 60.0,
            third.live_sessions,
            third.db_mb,
            third.rss_mb,
            third.leaf_p99_ms
        );
    }
    eprintln!(
        "\nlast third: redb {:+.1} %, RSS {:+.1} %; {:.0} bytes of redb per session kept; {} sessions established, {} roots revoked",
        summary.db_growth_last_third * 100.0,
        summary.rss_growth_last_third * 100.0,
        summary.bytes_per_live_session,
        summary.established_total,
        summary.revoked_total
    );
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&serde_json::json!({"samples": samples, "summary": summary}))?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        let title = format!("caep-drill --soak: {} sessions/s, lifetimes {} s", args.rate, args.soak_ttl_secs);
        soak::plot(path, &samples, &title)?;
    }
    Ok(true)
}
