//! Counters the drill reads from each hub instance's `/metrics`: the broker
//! requests its Kafka clients sent (librdkafka statistics) and the cascade
//! leaves it signed, so a drill can say what each operation cost the broker
//! and how evenly instances shared the work.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

/// How stale the hub's broker-request counts may be (librdkafka reports
/// every 500 ms): a reading waits this long first, so it covers what was
/// sent up to the moment the stretch ended.
pub const STATS_LAG: Duration = Duration::from_millis(600);

const BROKER_REQUESTS: &str = "caep_kafka_broker_requests_total";
const LEAVES_SIGNED: &str = "caep_leaves_signed_total";

/// One reading of every instance (`None`: gone or not answering).
#[derive(Debug, Clone, Default)]
pub struct Counters {
    instances: Vec<Option<Instance>>,
}

#[derive(Debug, Clone, Default)]
struct Instance {
    /// Broker requests by type.
    requests: BTreeMap<String, f64>,
    leaves_signed: f64,
}

impl Counters {
    /// Reads `/metrics` of each `(url, admin token)`.
    pub async fn read(client: &reqwest::Client, instances: &[(String, String)]) -> Counters {
        let mut read = Vec::with_capacity(instances.len());
        for (url, token) in instances {
            let text = async {
                let response = client.get(format!("{url}/metrics")).bearer_auth(token).send().await.ok()?;
                response.status().is_success().then_some(())?;
                response.text().await.ok()
            };
            read.push(text.await.map(|text| parse(&text)));
        }
        Counters { instances: read }
    }
}

/// The series this module reads, from Prometheus text.
fn parse(text: &str) -> Instance {
    let mut instance = Instance::default();
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let Ok(value) = value.parse::<f64>() else { continue };
        if series == LEAVES_SIGNED {
            instance.leaves_signed = value;
        } else if let Some(labels) = series.strip_prefix(BROKER_REQUESTS).and_then(|rest| rest.strip_prefix('{')) {
            let request = labels.split('"').nth(1).unwrap_or_default();
            *instance.requests.entry(request.to_owned()).or_default() += value;
        }
    }
    instance
}

/// What a stretch of the drill cost the broker, and who signed its leaves.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CountersSpent {
    /// Broker requests of every instance together, by type (only instances
    /// read at both ends count).
    pub broker_requests: BTreeMap<String, u64>,
    /// All of them per operation of the stretch (setup operation or leaf);
    /// `None` outside Kafka mode.
    pub broker_requests_per_op: Option<f64>,
    /// Leaves each instance signed (`null`: not read at both ends).
    pub leaves_signed: Vec<Option<u64>>,
}

impl CountersSpent {
    /// From `from` to `to`, over `ops` operations.
    pub fn between(from: &Counters, to: &Counters, ops: usize) -> CountersSpent {
        let mut spent = CountersSpent::default();
        for (a, b) in from.instances.iter().zip(&to.instances) {
            let (Some(a), Some(b)) = (a, b) else {
                spent.leaves_signed.push(None);
                continue;
            };
            spent.leaves_signed.push(Some((b.leaves_signed - a.leaves_signed).max(0.0) as u64));
            for (request, count) in &b.requests {
                let grew = (count - a.requests.get(request).copied().unwrap_or(0.0)).max(0.0) as u64;
                *spent.broker_requests.entry(request.clone()).or_default() += grew;
            }
        }
        let total: u64 = spent.broker_requests.values().sum();
        spent.broker_requests_per_op = (total > 0 && ops > 0).then(|| total as f64 / ops as f64);
        spent
    }

    /// The most frequent request types, `Produce 3.1, Fetch 2.0`, per operation.
    pub fn top_requests(&self, ops: usize, n: usize) -> String {
        let mut by_count: Vec<(&String, &u64)> = self.broker_requests.iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(a.1));
        by_count
            .into_iter()
            .take(n)
            .map(|(request, count)| format!("{request} {:.2}", *count as f64 / ops.max(1) as f64))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "# TYPE caep_kafka_broker_requests_total counter\n\
        caep_kafka_broker_requests_total{request=\"Produce\"} 10\n\
        caep_kafka_broker_requests_total{request=\"Fetch\"} 100\n\
        caep_leaves_signed_total 5\n";
    const AFTER: &str = "caep_kafka_broker_requests_total{request=\"Produce\"} 40\n\
        caep_kafka_broker_requests_total{request=\"Fetch\"} 160\n\
        caep_kafka_broker_requests_total{request=\"ListOffsets\"} 10\n\
        caep_leaves_signed_total 25\n";

    #[test]
    fn requests_and_leaves_are_the_growth_between_readings() {
        let from = Counters { instances: vec![Some(parse(BEFORE)), Some(parse(BEFORE)), None] };
        let to = Counters { instances: vec![Some(parse(AFTER)), None, Some(parse(AFTER))] };
        let spent = CountersSpent::between(&from, &to, 10);
        assert_eq!(spent.leaves_signed, vec![Some(20), None, None]);
        assert_eq!(spent.broker_requests["Produce"], 30);
        assert_eq!(spent.broker_requests["Fetch"], 60);
        assert_eq!(spent.broker_requests["ListOffsets"], 10);
        assert_eq!(spent.broker_requests_per_op, Some(10.0));
        assert_eq!(spent.top_requests(10, 2), "Fetch 6.00, Produce 3.00");
    }

    #[test]
    fn an_embedded_hub_has_no_broker_requests() {
        let embedded = Counters { instances: vec![Some(parse("caep_leaves_signed_total 3\n"))] };
        let later = Counters { instances: vec![Some(parse("caep_leaves_signed_total 9\n"))] };
        let spent = CountersSpent::between(&embedded, &later, 6);
        assert_eq!(spent.broker_requests_per_op, None);
        assert_eq!(spent.leaves_signed, vec![Some(6)]);
    }
}
