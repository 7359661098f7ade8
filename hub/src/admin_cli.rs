//! `caep-hub admin ...`: the operator's command line over the hub's `/admin`
//! HTTP API, so it works against any running hub (embedded or any Kafka
//! instance). The token comes from `CAEP_HUB_ADMIN_TOKEN`, never from an
//! argument (arguments show in `ps` and shell history).
//!
//! Output is a table by default and the API's JSON with `--json`. Table
//! cells come from IdPs and receivers (session ids, names, reasons), so
//! control characters are shown escaped, never sent to the terminal.

use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

/// Options every admin command takes.
#[derive(Args, Debug)]
pub struct AdminArgs {
    /// Base URL of the hub.
    #[arg(long, env = "CAEP_HUB_URL", default_value = "http://127.0.0.1:8080", global = true)]
    pub hub: String,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Identity providers whose SETs the hub accepts.
    #[command(subcommand)]
    Issuers(IssuersCommand),
    /// Relying parties and their tokens.
    #[command(subcommand)]
    Receivers(ReceiversCommand),
    /// Streams, their health and status.
    #[command(subcommand)]
    Streams(StreamsCommand),
    /// Revocation cascades.
    #[command(subcommand)]
    Cascades(CascadesCommand),
    /// SETs delivery gave up on.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(DeadLettersCommand),
}

#[derive(Subcommand, Debug)]
pub enum IssuersCommand {
    List,
    /// Trust an IdP, with its keys inline (a JWKS file) or fetched from an https URL.
    Add {
        issuer: String,
        #[arg(long, conflicts_with = "jwks_file", required_unless_present = "jwks_file")]
        jwks_uri: Option<String>,
        #[arg(long, value_name = "FILE")]
        jwks_file: Option<std::path::PathBuf>,
    },
    /// Stop trusting an IdP.
    Remove {
        issuer: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ReceiversCommand {
    List,
    /// Register a receiver; its bearer token is printed once.
    Add {
        #[arg(long)]
        name: String,
        #[arg(long)]
        audience: String,
        /// An IdP whose sessions it may hear about (repeat; none: every trusted IdP).
        #[arg(long = "issuer")]
        issuers: Vec<String>,
        /// Grant its streams every subject of its IdPs.
        #[arg(long)]
        all_subjects: bool,
    },
    /// Remove a receiver, its streams and their queues.
    Remove {
        receiver_id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum StreamsCommand {
    List,
    Show {
        stream_id: String,
    },
    /// Pause: SETs are held until resumed; the receiver is told.
    Pause {
        stream_id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Resume a paused or disabled stream; the receiver is told.
    Resume {
        stream_id: String,
    },
    /// Disable: the queue is dropped; the receiver is told.
    Disable {
        stream_id: String,
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum CascadesCommand {
    /// Cascades in progress and recently completed.
    List {
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// One cascade's report.
    Show {
        txn: String,
        /// The IdP, when several used this txn.
        #[arg(long)]
        issuer: Option<String>,
        /// List every leaf.
        #[arg(long)]
        leaves: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum DeadLettersCommand {
    List {
        #[arg(long)]
        stream: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// The `next_cursor` a previous page printed.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Put dead letters back in their stream's queue (all of the stream's, or the `--jti`s given).
    Replay {
        stream_id: String,
        #[arg(long = "jti")]
        jtis: Vec<String>,
    },
}

/// Runs an admin command against the hub; `token` is the admin token.
pub fn run(args: AdminArgs, token: Option<String>) -> anyhow::Result<()> {
    let token = token.filter(|t| !t.is_empty()).context("set CAEP_HUB_ADMIN_TOKEN to the hub's admin token")?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let api = Api { client: reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?, args: &args, token };
    let output = runtime.block_on(api.execute(&args.command))?;
    print!("{output}");
    Ok(())
}

struct Api<'a> {
    client: reqwest::Client,
    args: &'a AdminArgs,
    token: String,
}

/// A path segment, percent-encoded (ids may hold any character).
fn segment(text: &str) -> String {
    askama::filters::urlencode_strict(text).map(|encoded| encoded.to_string()).unwrap_or_default()
}

impl Api<'_> {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.args.hub.trim_end_matches('/'));
        let mut request = self.client.request(method, &url).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.with_context(|| format!("cannot reach the hub at {}", self.args.hub))?;
        let status = response.status();
        let text = response.text().await.context("reading the hub's answer")?;
        let value: Value =
            if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
        if !status.is_success() {
            let reason = value["description"]
                .as_str()
                .or(value["err"].as_str())
                .map_or_else(|| value.to_string(), str::to_owned);
            bail!("the hub answered {status}: {}", printable(&reason));
        }
        Ok(value)
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    async fn delete(&self, path: &str) -> anyhow::Result<Value> {
        self.call(reqwest::Method::DELETE, path, None).await
    }

    /// The command's output: JSON, or a table or message.
    async fn execute(&self, command: &AdminCommand) -> anyhow::Result<String> {
        let (value, shown) = match command {
            AdminCommand::Issuers(command) => self.issuers(command).await?,
            AdminCommand::Receivers(command) => self.receivers(command).await?,
            AdminCommand::Streams(command) => self.streams(command).await?,
            AdminCommand::Cascades(command) => self.cascades(command).await?,
            AdminCommand::DeadLetters(command) => self.dead_letters(command).await?,
        };
        if self.args.json {
            return Ok(format!("{}\n", serde_json::to_string_pretty(&value)?));
        }
        Ok(shown)
    }

    async fn issuers(&self, command: &IssuersCommand) -> anyhow::Result<(Value, String)> {
        match command {
            IssuersCommand::List => {
                let issuers = self.get("/admin/issuers").await?;
                let rows = each(&issuers, |i| {
                    let keys = match i["jwks_uri"].as_str() {
                        Some(uri) => uri.to_owned(),
                        None => format!("{} inline", i["jwks"]["keys"].as_array().map_or(0, Vec::len)),
                    };
                    vec![text(&i["issuer"]), keys, time(&i["registered_at_ms"])]
                });
                Ok((issuers, table(&["ISSUER", "KEYS", "TRUSTED SINCE"], rows)))
            }
            IssuersCommand::Add { issuer, jwks_uri, jwks_file } => {
                let mut body = json!({"issuer": issuer});
                if let Some(uri) = jwks_uri {
                    body["jwks_uri"] = json!(uri);
                }
                if let Some(file) = jwks_file {
                    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
                    body["jwks"] =
                        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", file.display()))?;
                }
                let added = self.post("/admin/issuers", body).await?;
                let shown = format!("trusted {}\n", printable(issuer));
                Ok((added, shown))
            }
            IssuersCommand::Remove { issuer } => {
                self.delete(&format!("/admin/issuers/{}", segment(issuer))).await?;
                Ok((json!({"removed": issuer}), format!("no longer trusted: {}\n", printable(issuer))))
            }
        }
    }

    async fn receivers(&self, command: &ReceiversCommand) -> anyhow::Result<(Value, String)> {
        match command {
            ReceiversCommand::List => {
                let receivers = self.get("/admin/receivers").await?;
                let rows = each(&receivers, |r| {
                    vec![
                        text(&r["receiver_id"]),
                        text(&r["name"]),
                        text(&r["audience"]),
                        list(&r["issuers"]),
                        list(&r["streams"]),
                    ]
                });
                Ok((receivers, table(&["RECEIVER", "NAME", "AUDIENCE", "IDPS", "STREAMS"], rows)))
            }
            ReceiversCommand::Add { name, audience, issuers, all_subjects } => {
                let mut body = json!({"name": name, "audience": audience, "all_subjects": all_subjects});
                if !issuers.is_empty() {
                    body["issuers"] = json!(issuers);
                }
                let created = self.post("/admin/receivers", body).await?;
                let shown = format!(
                    "receiver {}\ntoken {}\n(the token is shown once: give it to the receiver)\n",
                    text(&created["receiver_id"]),
                    text(&created["token"])
                );
                Ok((created, shown))
            }
            ReceiversCommand::Remove { receiver_id } => {
                self.delete(&format!("/admin/receivers/{}", segment(receiver_id))).await?;
                Ok((json!({"removed": receiver_id}), format!("removed receiver {}\n", printable(receiver_id))))
            }
        }
    }

    async fn streams(&self, command: &StreamsCommand) -> anyhow::Result<(Value, String)> {
        let (stream_id, status, reason) = match command {
            StreamsCommand::List => {
                let streams = self.get("/admin/streams").await?;
                let rows = each(&streams, |s| {
                    vec![
                        text(&s["stream_id"]),
                        text(&s["receiver_id"]),
                        method(&s["method"]),
                        text(&s["status"]),
                        number(&s["queued"]),
                        number(&s["subjects"]),
                    ]
                });
                return Ok((streams, table(&["STREAM", "RECEIVER", "METHOD", "STATUS", "QUEUED", "SUBJECTS"], rows)));
            }
            StreamsCommand::Show { stream_id } => {
                let streams = self.get("/admin/streams").await?;
                let stream = streams
                    .as_array()
                    .and_then(|all| all.iter().find(|s| s["stream_id"] == stream_id.as_str()))
                    .cloned()
                    .with_context(|| format!("no stream {}", printable(stream_id)))?;
                let shown = fields(&stream);
                return Ok((stream, shown));
            }
            StreamsCommand::Pause { stream_id, reason } => (stream_id, "paused", reason.as_deref()),
            StreamsCommand::Resume { stream_id } => (stream_id, "enabled", None),
            StreamsCommand::Disable { stream_id, reason } => (stream_id, "disabled", reason.as_deref()),
        };
        let mut body = json!({"status": status});
        if let Some(reason) = reason {
            body["reason"] = json!(reason);
        }
        let changed = self.post(&format!("/admin/streams/{}/status", segment(stream_id)), body).await?;
        let shown = format!("stream {} is {}\n", printable(stream_id), text(&changed["status"]));
        Ok((changed, shown))
    }

    async fn cascades(&self, command: &CascadesCommand) -> anyhow::Result<(Value, String)> {
        match command {
            CascadesCommand::List { limit } => {
                let recent = self.get(&format!("/admin/cascades?limit={limit}")).await?;
                let row = |c: &Value| {
                    vec![
                        text(&c["txn"]),
                        text(&c["issuer"]),
                        text(&c["root"]),
                        format!("{}/{}", number(&c["delivered"]), number(&c["total"])),
                        number(&c["failed"]),
                        time(&c["started_at"]),
                        millis(&c["cascade_ms"]),
                    ]
                };
                let headers = ["TXN", "IDP", "ROOT", "DELIVERED", "FAILED", "STARTED", "TOOK"];
                let shown = format!(
                    "in progress ({}):\n{}completed:\n{}",
                    number(&recent["in_progress_total"]),
                    table(&headers, each(&recent["in_progress"], row)),
                    table(&headers, each(&recent["completed"], row))
                );
                Ok((recent, shown))
            }
            CascadesCommand::Show { txn, issuer, leaves } => {
                let mut path = format!("/admin/cascades/{}?leaves={leaves}", segment(txn));
                if let Some(issuer) = issuer {
                    path.push_str(&format!("&issuer={}", segment(issuer)));
                }
                let report = self.get(&path).await?;
                let mut summary = report.clone();
                if let Some(summary) = summary.as_object_mut() {
                    summary.remove("leaves");
                }
                let mut shown = fields(&summary);
                if *leaves {
                    let rows = each(&report["leaves"], |l| {
                        vec![
                            text(&l["session_id"]),
                            text(&l["stream_id"]),
                            text(&l["status"]),
                            millis(&l["latency_ms"]),
                            text(&l["err"]),
                        ]
                    });
                    shown.push_str(&table(&["SESSION", "STREAM", "STATUS", "LATENCY", "ERROR"], rows));
                }
                Ok((report, shown))
            }
        }
    }

    async fn dead_letters(&self, command: &DeadLettersCommand) -> anyhow::Result<(Value, String)> {
        match command {
            DeadLettersCommand::List { stream, limit, cursor } => {
                let mut path = format!("/admin/dead-letters?limit={limit}");
                for (name, value) in [("stream_id", stream), ("cursor", cursor)] {
                    if let Some(value) = value {
                        path.push_str(&format!("&{name}={}", segment(value)));
                    }
                }
                let page = self.get(&path).await?;
                let rows = each(&page["dead_letters"], |d| {
                    vec![
                        text(&d["stream_id"]),
                        text(&d["jti"]),
                        text(&d["err"]),
                        text(&d["description"]),
                        time(&d["failed_at_ms"]),
                    ]
                });
                let mut shown = table(&["STREAM", "JTI", "ERR", "DESCRIPTION", "FAILED"], rows);
                if let Some(next) = page["next_cursor"].as_str() {
                    shown.push_str(&format!("more: --cursor {}\n", printable(next)));
                }
                Ok((page, shown))
            }
            DeadLettersCommand::Replay { stream_id, jtis } => {
                let replayed =
                    self.post("/admin/dead-letters/replay", json!({"stream_id": stream_id, "jtis": jtis})).await?;
                let shown = format!("replayed {} to stream {}\n", number(&replayed["replayed"]), printable(stream_id));
                Ok((replayed, shown))
            }
        }
    }
}

/// `row` of every element of a JSON array.
fn each(array: &Value, row: impl Fn(&Value) -> Vec<String>) -> Vec<Vec<String>> {
    array.as_array().into_iter().flatten().map(row).collect()
}

/// A string member as printable text; other values as JSON; null as `-`.
fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) => printable(s),
        other => printable(&other.to_string()),
    }
}

fn number(value: &Value) -> String {
    value.as_u64().map_or_else(|| text(value), |n| n.to_string())
}

fn list(value: &Value) -> String {
    match value.as_array() {
        Some(items) if items.is_empty() => "-".to_owned(),
        Some(items) => items.iter().map(text).collect::<Vec<_>>().join(", "),
        None if value.is_null() => "all".to_owned(),
        None => text(value),
    }
}

fn method(value: &Value) -> String {
    match value.as_str() {
        Some(m) if m.ends_with("8935") => "push".to_owned(),
        Some(m) if m.ends_with("8936") => "poll".to_owned(),
        _ => text(value),
    }
}

fn time(value: &Value) -> String {
    value.as_u64().map_or_else(
        || "-".to_owned(),
        |ms| humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string(),
    )
}

fn millis(value: &Value) -> String {
    value.as_u64().map_or_else(|| "-".to_owned(), |ms| format!("{ms} ms"))
}

/// Text with control characters escaped (`\u{1b}` rather than an escape
/// sequence the terminal would act on).
pub fn printable(text: &str) -> String {
    text.chars().flat_map(|c| if c.is_control() { c.escape_unicode().collect() } else { vec![c] }).collect()
}

/// `name: value` lines of an object's members.
fn fields(object: &Value) -> String {
    object
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, value)| format!("{:<16} {}\n", printable(name), text(value)))
        .collect()
}

/// Left-aligned columns, two spaces apart, widths in characters.
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell}{}", " ".repeat(width - cell.chars().count())))
            .collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut out = line(headers.to_vec());
    for row in &rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_never_reach_the_terminal() {
        assert_eq!(printable("a\u{1b}[31mb\n"), "a\\u{1b}[31mb\\u{a}");
        assert_eq!(printable("\u{9b}2J"), "\\u{9b}2J", "C1 controls too");
        assert_eq!(text(&json!("s\u{7}")), "s\\u{7}");
    }

    #[test]
    fn tables_align_columns_by_characters() {
        let shown = table(&["A", "BB"], vec![vec!["ééé".into(), "x".into()], vec!["z".into(), "yyy".into()]]);
        assert_eq!(shown, "A    BB\nééé  x\nz    yyy\n");
    }
}
