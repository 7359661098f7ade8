//! Prometheus metrics: one recorder per process, rendered at `GET /metrics`.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets in seconds: fine below 100 ms, where cascades should land.
const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process's metrics handle, installing the recorder on first use.
/// `None` when another recorder was installed first (then nothing renders).
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .ok()?;
            match builder.install_recorder() {
                Ok(handle) => {
                    describe();
                    Some(handle)
                }
                Err(error) => {
                    tracing::warn!(%error, "metrics recorder not installed");
                    None
                }
            }
        })
        .as_ref()
}

/// Describes the hub's metrics and starts its counters at zero, so a scrape
/// shows every series from the start rather than after the first event.
fn describe() {
    use metrics::{Unit, counter, describe_counter, describe_histogram};
    describe_counter!("caep_sets_emitted_total", "SETs signed and durably put in the outbox");
    describe_counter!("caep_leaves_signed_total", "cascade leaves this instance signed and handed over for delivery");
    describe_counter!(
        "caep_kafka_broker_requests_total",
        "requests this instance's Kafka clients sent to brokers, by type (librdkafka statistics)"
    );
    describe_counter!("caep_deliveries_total", "SETs that left the outbox, by method and outcome");
    describe_counter!("caep_push_attempts_total", "push POSTs, by outcome (delivered, rejected, retry)");
    describe_counter!("caep_poll_sets_served_total", "poll responses that carried SETs");
    describe_histogram!("caep_delivery_latency_seconds", Unit::Seconds, "outbox to receiver acknowledgement");
    describe_histogram!(
        "caep_leaf_latency_seconds",
        Unit::Seconds,
        "IdP event ingest to a cascade leaf's acknowledgement"
    );
    describe_histogram!("caep_cascade_completion_seconds", Unit::Seconds, "IdP event ingest to a cascade's last leaf");
    describe_counter!("caep_pruned_total", "records removed by the pruning job, by kind");
    describe_counter!("caep_sets_expired_total", "SETs dead-lettered unacknowledged at the delivery give-up age");
    describe_counter!("caep_streams_paused_inactive_total", "streams paused for receiver inactivity");
    describe_histogram!("caep_prune_seconds", Unit::Seconds, "one pruning pass");
    counter!("caep_sets_emitted_total").absolute(0);
    counter!("caep_leaves_signed_total").absolute(0);
    for method in ["push", "poll"] {
        for outcome in ["delivered", "failed"] {
            counter!("caep_deliveries_total", "method" => method, "outcome" => outcome).absolute(0);
        }
    }
    for outcome in ["delivered", "rejected", "retry"] {
        counter!("caep_push_attempts_total", "outcome" => outcome).absolute(0);
    }
    for kind in
        ["sessions", "cascades", "leaves", "replay_records", "pending_touches", "dead_letters", "deleted_stream_ids"]
    {
        counter!("caep_pruned_total", "kind" => kind).absolute(0);
    }
}

/// This hub's streams, rendered at each scrape rather than recorded: a
/// bounded set of series (by status, and the outbox in total and at its
/// deepest stream), none per stream id, so churn of streams cannot grow the
/// scrape and a deleted stream leaves nothing behind. Per-stream depth is in
/// `GET /admin/streams`.
pub fn render_streams(transmitter: &caep_transmitter::service::Transmitter) -> String {
    use caep_schemas::event::StreamStatus;
    let (mut enabled, mut paused, mut disabled, mut total, mut deepest) = (0u64, 0u64, 0u64, 0u64, 0u64);
    for record in transmitter.streams().all() {
        match record.status {
            StreamStatus::Enabled => enabled += 1,
            StreamStatus::Paused => paused += 1,
            StreamStatus::Disabled => disabled += 1,
        }
        let depth = transmitter.outbox().depth(&record.config.stream_id).unwrap_or(0);
        total += depth;
        deepest = deepest.max(depth);
    }
    format!(
        "# HELP caep_streams Streams by status\n# TYPE caep_streams gauge\n\
         caep_streams{{status=\"enabled\"}} {enabled}\ncaep_streams{{status=\"paused\"}} {paused}\n\
         caep_streams{{status=\"disabled\"}} {disabled}\n\
         # HELP caep_outbox_depth SETs waiting for their receivers, all streams\n# TYPE caep_outbox_depth gauge\n\
         caep_outbox_depth {total}\n\
         # HELP caep_outbox_depth_max SETs waiting at the stream with the most\n# TYPE caep_outbox_depth_max gauge\n\
         caep_outbox_depth_max {deepest}\n"
    )
}

/// What the hub's own store keeps, rendered at each scrape: sessions in the
/// graph (live, kept for their sub-agents, or revoked within retention) and
/// cascade reports. In Kafka mode sessions live in the graph partitions'
/// stores, so `caep_graph_sessions` counts only this store's.
pub fn render_kept(store: &caep_transmitter::store::Store) -> String {
    let sessions = store.read(crate::graph::session_count).unwrap_or(0);
    let cascades = store.read(crate::cascade::cascade_count).unwrap_or(0);
    format!(
        "# HELP caep_graph_sessions Sessions kept in the graph (live, linking sub-agents, or revoked within retention)
         # TYPE caep_graph_sessions gauge
caep_graph_sessions {sessions}
         # HELP caep_cascades_kept Cascade reports kept
# TYPE caep_cascades_kept gauge
caep_cascades_kept {cascades}
"
    )
}

/// Records leaf latencies and completed cascades (on the instance that
/// delivered the leaves, so a cluster counts each once).
pub fn record_settled(applied: &crate::cascade::Applied) {
    for latency in &applied.leaf_latencies_ms {
        metrics::histogram!("caep_leaf_latency_seconds").record(*latency as f64 / 1000.0);
    }
    for (cascade_txn, took) in &applied.completed {
        metrics::histogram!("caep_cascade_completion_seconds").record(*took as f64 / 1000.0);
        tracing::info!(txn = %cascade_txn, cascade_ms = took, "cascade complete");
    }
}
