//! A fixed-rate load generator for `caep-guard`'s `/check` (or any URL):
//! `CONNECTIONS` keep-alive connections share `RATE` requests per second for
//! `SECONDS`, each request due at its scheduled time. A request's latency
//! runs from its scheduled time when the one before it on its connection
//! answered late (the server's delay, kept in the figures rather than
//! slowing the load), and from when it was sent otherwise (the timer's own
//! jitter is not the server's). wrk, closed-loop, measures at saturation
//! instead.
//!
//! ```sh
//! cargo build --release -p caep-receiver --example check_load
//! target/release/examples/check_load http://127.0.0.1:9090/check 10000 10 16 "Bearer $AGENT_JWT"
//! ```

use std::time::{Duration, Instant};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut args = std::env::args().skip(1);
    let usage = "check_load URL RATE SECONDS CONNECTIONS [AUTHORIZATION]";
    let url = args.next().ok_or(usage)?;
    let rate: f64 = args.next().ok_or(usage)?.parse()?;
    let seconds: f64 = args.next().ok_or(usage)?.parse()?;
    let connections = args.next().ok_or(usage)?.parse::<usize>()?.max(1);
    let authorization = args.next();
    let per_connection = (rate * seconds) as usize / connections;
    let interval = Duration::from_secs_f64(connections as f64 / rate);
    let start = Instant::now() + Duration::from_millis(200);
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..connections {
        let (url, authorization) = (url.clone(), authorization.clone());
        // Connections start staggered over one interval.
        let offset = interval.mul_f64(worker as f64 / connections as f64);
        workers.spawn(async move {
            let client = reqwest::Client::builder().pool_max_idle_per_host(1).build()?;
            let (mut latencies, mut failed) = (Vec::with_capacity(per_connection), 0u64);
            let mut previous_done = start;
            for n in 0..per_connection {
                let scheduled = start + offset + interval.mul_f64(n as f64);
                tokio::time::sleep_until(scheduled.into()).await;
                let sent = Instant::now();
                let mut request = client.get(&url);
                if let Some(value) = &authorization {
                    request = request.header("authorization", value);
                }
                let answered = request.send().await.is_ok_and(|r| r.status().is_success() || r.status() == 401);
                let done = Instant::now();
                let from = if previous_done > scheduled { scheduled } else { sent };
                previous_done = done;
                if answered {
                    latencies.push((done - from).as_secs_f64() * 1000.0);
                } else {
                    failed += 1;
                }
            }
            Ok::<_, reqwest::Error>((latencies, failed))
        });
    }
    let (mut all, mut failed) = (Vec::new(), 0);
    while let Some(done) = workers.join_next().await {
        let (latencies, lost) = done??;
        all.extend(latencies);
        failed += lost;
    }
    let took = start.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    let at = |q: f64| all.get(((all.len() as f64 * q).ceil() as usize).clamp(1, all.len().max(1)) - 1).copied();
    let show = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{v:.2} ms"));
    println!(
        "{} requests at {rate}/s on {connections} connections over {took:.1} s ({:.0}/s answered), {failed} failed; \
         latency p50 {}, p90 {}, p99 {}, max {}",
        all.len(),
        all.len() as f64 / took,
        show(at(0.50)),
        show(at(0.90)),
        show(at(0.99)),
        show(all.last().copied())
    );
    Ok(())
}
