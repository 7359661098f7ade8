//! The operator console in a real browser: headless Chromium from Debian's
//! packages, driven over WebDriver (`chromedriver`), against a real hub on
//! loopback with real IdP and receivers. `.ci/test` installs both packages;
//! `CAEP_CHROMEDRIVER` and `CAEP_CHROMIUM` point elsewhere.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use reqwest::Method;
use serde_json::{Value, json};
use support::actors::{IDP, Idp, Relying, complete_cascade, email, session_of};
use support::{
    ADMIN_TOKEN, Answer, Body, Hub, PushReceiver, SESSION_REVOKED, STREAM_UPDATED, TICK, VERIFICATION, WAIT,
};

/// Headless Chromium under chromedriver; both end when dropped.
struct Browser {
    client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

impl Browser {
    async fn start() -> Browser {
        let driver_path = std::env::var("CAEP_CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into());
        let chromium = std::env::var("CAEP_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        assert!(
            std::path::Path::new(&driver_path).exists() && std::path::Path::new(&chromium).exists(),
            "browser tests need Debian's chromium and chromium-driver (.ci/test installs them)"
        );
        let port = free_port();
        let driver = Command::new(&driver_path)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let profile = tempfile::tempdir().expect("profile dir");
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1400,1000",
            &format!("--user-data-dir={}", profile.path().display()),
        ];
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("browserName".into(), json!("chrome"));
        capabilities.insert("goog:chromeOptions".into(), json!({"binary": chromium, "args": args}));
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = loop {
            match ClientBuilder::native().capabilities(capabilities.clone()).connect(&url).await {
                Ok(client) => break client,
                Err(error) => {
                    assert!(Instant::now() < deadline, "chromedriver never answered: {error}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        Browser { client, driver, _profile: profile }
    }

    async fn goto(&self, url: &str) {
        self.client.goto(url).await.expect("navigates");
    }

    async fn text(&self, css: &str) -> String {
        self.client.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}")).text().await.expect("text")
    }

    async fn click(&self, css: &str) {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
            .click()
            .await
            .expect("click");
    }

    /// Clicks what navigates (a link, a form's button) and waits until the
    /// next page has loaded, so what follows reads the new page.
    async fn follow(&self, css: &str) {
        // A mark on this document: gone once the next one has replaced it
        // (the next page may have the same URL, e.g. after logging in).
        self.client.execute("window.caepOldPage = true", vec![]).await.expect("mark the page");
        self.click(css).await;
        let deadline = Instant::now() + WAIT;
        let replaced = "return window.caepOldPage === undefined && document.readyState === 'complete'";
        while self.client.execute(replaced, vec![]).await.ok() != Some(json!(true)) {
            assert!(Instant::now() < deadline, "clicking {css} led to no new page");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn count(&self, css: &str) -> usize {
        self.client.find_all(Locator::Css(css)).await.expect("find_all").len()
    }

    async fn type_into(&self, css: &str, text: &str) {
        let field = self.client.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}"));
        field.send_keys(text).await.expect("typing");
    }

    /// Logs in with `token` from the login form at `url`.
    async fn log_in(&self, url: &str, token: &str) {
        self.goto(url).await;
        self.type_into("#token", token).await;
        self.follow("#login").await;
    }

    /// Reloads until `css` holds `expected`, or fails after [`WAIT`].
    async fn wait_for_text(&self, url: &str, css: &str, expected: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            self.goto(url).await;
            let found = match self.client.find(Locator::Css(css)).await {
                Ok(element) => element.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            if found.contains(expected) {
                return;
            }
            assert!(Instant::now() < deadline, "{css} at {url} never showed {expected:?}; last: {found:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The console session cookie's value.
    async fn session_cookie(&self) -> String {
        self.client.get_named_cookie("caep_console").await.expect("session cookie").value().to_owned()
    }
}

/// A drill in miniature: root R with sub-agents C1 → G and C2; two RPs
/// touched by different sessions; R revoked with txn `txn-drill`.
async fn revoked_tree(hub: &Hub) -> (Relying, Relying) {
    let idp = Idp::register(hub, IDP).await;
    let ada = email("ada@example.com");
    idp.establish(hub, "R", &ada, None).await;
    idp.establish(hub, "C1", &ada, Some("R")).await;
    idp.establish(hub, "C2", &ada, Some("R")).await;
    idp.establish(hub, "G", &ada, Some("C1")).await;
    let payments = Relying::new(hub, "payments", true, &[SESSION_REVOKED], false).await;
    let mail = Relying::new(hub, "mail", true, &[SESSION_REVOKED], false).await;
    for id in ["R", "C1", "G"] {
        payments.add_subject(hub, id).await;
    }
    for id in ["C2", "G"] {
        mail.add_subject(hub, id).await;
    }
    let revoke = idp.set(session_of("R", &ada), SESSION_REVOKED, json!({"initiating_entity": "policy"}));
    idp.send(hub, &revoke.with_txn("txn-drill")).await;
    payments.settle(hub, 3).await;
    mail.settle(hub, 2).await;
    complete_cascade(hub, "txn-drill", 5).await;
    (payments, mail)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_logs_in_follows_a_cascade_through_its_tree_and_logs_out() {
    let hub = Hub::start().await;
    let _rps = revoked_tree(&hub).await;
    let browser = Browser::start().await;
    let cascade_url = format!("{}/console/cascades/txn-drill", hub.issuer);

    // Not logged in: the login form, and a wrong token is refused.
    browser.log_in(&cascade_url, "not-the-token").await;
    assert_eq!(browser.text("#refused").await, "That admin token was not accepted.");
    assert_eq!(browser.count("#tree").await, 0, "nothing shown before login");

    // Logged in: back at the cascade asked for, complete with every leaf.
    browser.type_into("#token", ADMIN_TOKEN).await;
    browser.follow("#login").await;
    assert_eq!(browser.client.current_url().await.expect("url").path(), "/console/cascades/txn-drill");
    assert!(browser.text("#state").await.starts_with("Complete"), "{}", browser.text("#state").await);
    assert_eq!((browser.text("#delivered").await, browser.text("#total").await), ("5".into(), "5".into()));
    assert_eq!(browser.count("tr.leaf.delivered").await, 5);
    assert_eq!(browser.count("#incomplete").await, 0, "nothing incomplete");
    assert_eq!(browser.count("svg#cdf path").await, 1, "the latency CDF is drawn");
    // The tree nests sub-agents under their parents: G under C1 under R.
    assert_eq!(
        browser.count(r#"details[data-session="R"] details[data-session="C1"] details[data-session="G"]"#).await,
        1
    );
    assert_eq!(browser.count(r#"details[data-session="R"] > details[data-session="C2"]"#).await, 1);

    // The overview lists the cascade as completed and both receivers.
    browser.goto(&format!("{}/console", hub.issuer)).await;
    assert!(browser.text("#cascades-done").await.contains("txn-drill"));
    assert!(browser.text("#receivers").await.contains("payments"));
    assert!(browser.text("#issuers").await.contains(IDP));

    // A session's page: its chain up to the root, its touches, its state.
    // Sessions whose leaves all arrived start folded: open C1 to reach G.
    browser.goto(&cascade_url).await;
    let g_link = r#"details[data-session="G"] > summary a"#;
    let visible = browser.client.find(Locator::Css(g_link)).await.expect("G").is_displayed().await.expect("shown");
    assert!(!visible, "G is folded inside C1");
    browser.click(r#"details[data-session="C1"] > summary > .count"#).await;
    browser.follow(g_link).await;
    assert_eq!(browser.text("#session-id").await, "G");
    assert_eq!(browser.text("#chain").await.split_whitespace().collect::<Vec<_>>(), ["R", "C1", "G"]);
    assert!(browser.text("#session-state").await.contains("revoked"), "{}", browser.text("#session-state").await);
    assert_eq!(browser.count("#touches tr").await, 3, "header and two RPs");
    browser.goto(&format!("{}/console/sessions/R", hub.issuer)).await;
    assert_eq!(browser.count("#subtree tr").await, 4, "header, C1, C2, G");

    // The cookie is out of the page's reach, and logout ends access.
    let cookies = browser.client.execute("return document.cookie", vec![]).await.expect("script");
    assert_eq!(cookies, json!(""), "the session cookie is HttpOnly");
    browser.follow("#logout").await;
    browser.goto(&cascade_url).await;
    assert_eq!(browser.count("#token").await, 1, "the login form again");
    assert_eq!(browser.count("#tree").await, 0);
}

/// Waits until `receiver` got a SET of `event_type`; returns its event member.
async fn wait_for_event(hub: &Hub, receiver: &PushReceiver, rp: &support::Rp, event_type: &str, seen: usize) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let requests = receiver.requests();
        for request in requests.iter().skip(seen) {
            let set = hub.verify_set(&request.body, rp);
            let claims = set.to_claims();
            if let Some(event) = claims["events"].get(event_type) {
                return event.clone();
            }
        }
        assert!(Instant::now() < deadline, "no {event_type} SET arrived");
        tokio::time::sleep(TICK).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pausing_resuming_and_verifying_a_stream_reach_the_receiver() {
    let hub = Hub::start().await;
    let rp = hub.receiver("paused-rp").await;
    let receiver = PushReceiver::accepting().await;
    let stream_id = hub.push_stream(&rp, &receiver.url, None).await;
    let browser = Browser::start().await;
    let stream_url = format!("{}/console/streams/{stream_id}", hub.issuer);
    browser.log_in(&stream_url, ADMIN_TOKEN).await;
    assert_eq!(browser.text("#status").await, "enabled");

    browser.type_into("input[name=reason]", "maintenance window").await;
    browser.follow("#pause").await;
    assert!(browser.text("#status").await.starts_with("paused"));
    assert!(browser.text("#message").await.starts_with("Stream paused"));
    let paused = wait_for_event(&hub, &receiver, &rp, STREAM_UPDATED, 0).await;
    assert_eq!(paused["status"], "paused", "{paused}");
    assert_eq!(paused["reason"], "maintenance window", "{paused}");
    assert_eq!(hub.admin_stream(&stream_id).await["status"], "paused");

    let seen = receiver.requests().len();
    browser.follow("#resume").await;
    assert_eq!(browser.text("#status").await, "enabled");
    let resumed = wait_for_event(&hub, &receiver, &rp, STREAM_UPDATED, seen).await;
    assert_eq!(resumed["status"], "enabled", "{resumed}");

    let seen = receiver.requests().len();
    browser.follow("#verify").await;
    assert!(browser.text("#message").await.starts_with("Verification SET queued"));
    wait_for_event(&hub, &receiver, &rp, VERIFICATION, seen).await;
    browser.wait_for_text(&stream_url, "#verification", "acknowledged").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_replayed_from_the_console_and_delivered() {
    let hub = Hub::start().await;
    let rp = hub.receiver("rejecting").await;
    let rejection = Answer::Json(400, json!({"err": "invalid_key", "description": "rotated <b>key</b>"}));
    let receiver = PushReceiver::scripted(Vec::new(), rejection).await;
    let stream_id = hub.push_stream(&rp, &receiver.url, None).await;
    hub.verify(&rp, &stream_id, "to-be-rejected").await;
    let first = receiver.wait_for(1).await;
    let deadline = Instant::now() + WAIT;
    while hub.dead_letters(&stream_id).await.is_empty() {
        assert!(Instant::now() < deadline, "never dead-lettered");
        tokio::time::sleep(TICK).await;
    }

    let browser = Browser::start().await;
    let letters_url = format!("{}/console/dead-letters?stream_id={stream_id}", hub.issuer);
    browser.log_in(&letters_url, ADMIN_TOKEN).await;
    let row = browser.text("#letters").await;
    assert!(row.contains("invalid_key") && row.contains("rotated <b>key</b>"), "{row}");
    assert_eq!(browser.count("#letters tr").await, 2, "header and the letter");

    // A page position in another stream does not list that stream's letters.
    browser
        .goto(&format!("{}/console/dead-letters?stream_id=other&after_stream={stream_id}&after_seq=0", hub.issuer))
        .await;
    assert_eq!(browser.count("#none").await, 1, "nothing of {stream_id} under another stream");
    assert_eq!(browser.count("#replay-all").await, 0);

    browser.goto(&letters_url).await;
    receiver.answer_from_now(Answer::Status(202));
    browser.follow("button.replay").await;
    assert!(browser.text("#message").await.starts_with("1 replayed"));
    assert_eq!(browser.count("#none").await, 1, "no dead letters left");
    let pushes = receiver.wait_for(2).await;
    assert_eq!(pushes[1].body, first[0].body, "the same SET, delivered this time");
    hub.wait_queued(&stream_id, 0).await;
}

/// Strings an IdP or a receiver chooses, built to break out of HTML.
const SCRIPT_ID: &str = r#"<script>window.pwned=1</script>"'><img src=x onerror="window.pwned=2">"#;
const DESCRIPTION: &str = r#"</dd><script>window.pwned=3</script>" onmouseover="window.pwned=4"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attacker_strings_render_as_text_and_a_form_without_its_csrf_token_is_refused() {
    let hub = Hub::start().await;
    let idp = Idp::register(&hub, IDP).await;
    let ada = email("ada@example.com");
    idp.establish(&hub, SCRIPT_ID, &ada, None).await;
    let rp = hub.receiver("hostile").await;
    let receiver = PushReceiver::accepting().await;
    let body = json!({"delivery": {"method": support::PUSH, "endpoint_url": receiver.url},
                      "events_requested": [SESSION_REVOKED], "description": DESCRIPTION});
    let stream_id = hub.create_stream(&rp, body).await["stream_id"].as_str().expect("stream_id").to_owned();
    let subject = json!({"stream_id": stream_id, "subject": {"format": "complex", "session": {"format": "opaque", "id": SCRIPT_ID}}});
    hub.post(&hub.endpoint("add_subject_endpoint"), &rp.token, subject).await.expect(200);
    let revoke = idp.set(session_of(SCRIPT_ID, &ada), SESSION_REVOKED, json!({})).with_txn(SCRIPT_ID);
    idp.send(&hub, &revoke).await;
    receiver.wait_for(1).await;

    let browser = Browser::start().await;
    let encoded = |s: &str| s.bytes().map(|b| format!("%{b:02X}")).collect::<String>();
    let cascade_url = format!("{}/console/cascades/{}", hub.issuer, encoded(SCRIPT_ID));
    browser.log_in(&cascade_url, ADMIN_TOKEN).await;
    assert_eq!(browser.text("#txn").await, SCRIPT_ID, "the txn is shown as text");
    assert_eq!(browser.text(r#"#tree summary a"#).await, SCRIPT_ID);
    browser.follow("#tree summary a").await;
    assert_eq!(browser.text("#session-id").await, SCRIPT_ID, "the session id is shown as text");
    browser.goto(&format!("{}/console/streams/{stream_id}", hub.issuer)).await;
    assert_eq!(browser.text("#description").await, DESCRIPTION, "the description is shown as text");
    browser.goto(&format!("{}/console", hub.issuer)).await;
    let pwned = browser.client.execute("return window.pwned === undefined ? null : window.pwned", vec![]).await;
    assert_eq!(pwned.expect("script"), Value::Null, "nothing the attacker wrote ran");

    // The session cookie alone does not change state: the form's CSRF
    // token is needed, and a cross-site request is refused even with it.
    let cookie = format!("caep_console={}", browser.session_cookie().await);
    let status_url = format!("{}/console/streams/{stream_id}/status", hub.issuer);
    let http =
        reqwest::Client::builder().no_proxy().redirect(reqwest::redirect::Policy::none()).build().expect("client");
    let post = |form: Vec<(&'static str, String)>, site: &'static str| {
        http.post(&status_url).header("cookie", &cookie).header("sec-fetch-site", site).form(&form).send()
    };
    let refused = post(vec![("status", "paused".into())], "same-origin").await.expect("request");
    assert_eq!(refused.status(), 403);
    let refused =
        post(vec![("status", "paused".into()), ("csrf", "guessed".into())], "same-origin").await.expect("request");
    assert_eq!(refused.status(), 403);
    browser.goto(&format!("{}/console/streams/{stream_id}", hub.issuer)).await;
    let csrf = browser
        .client
        .find(Locator::Css("input[name=csrf]"))
        .await
        .expect("csrf field")
        .attr("value")
        .await
        .expect("attr")
        .expect("value");
    let cross_site =
        post(vec![("status", "paused".into()), ("csrf", csrf.clone())], "cross-site").await.expect("request");
    assert_eq!(cross_site.status(), 403);
    assert_eq!(hub.admin_stream(&stream_id).await["status"], "enabled", "nothing changed");
    let accepted = post(vec![("status", "paused".into()), ("csrf", csrf)], "same-origin").await.expect("request");
    assert_eq!(accepted.status(), 303, "with the token, from the console itself");
    assert_eq!(hub.admin_stream(&stream_id).await["status"], "paused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_responses_forbid_script_and_framing_and_admin_tokens_alone_do_not_log_in() {
    let hub = Hub::start().await;
    let http = &hub.http;
    let page = http.get(format!("{}/console", hub.issuer)).send().await.expect("console");
    assert_eq!(page.status(), 200, "the login form");
    let policy = page.headers()["content-security-policy"].to_str().expect("ASCII").to_owned();
    assert!(policy.contains("default-src 'none'") && !policy.contains("script-src"), "{policy}");
    assert_eq!(page.headers()["x-frame-options"], "DENY");
    assert_eq!(page.headers()["cache-control"], "no-store");
    // The admin API's bearer token is not a console session.
    let bearer = http
        .get(format!("{}/console/dead-letters", hub.issuer))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("request");
    assert_eq!(bearer.status(), 401);
    assert!(bearer.text().await.expect("body").contains("id=\"token\""), "the login form, nothing else");
    // A login without the form's nonce (a cross-site login attempt) is refused.
    let forged = http
        .post(format!("{}/console/login", hub.issuer))
        .form(&[("token", ADMIN_TOKEN), ("nonce", "x"), ("next", "/console")])
        .send()
        .await
        .expect("request");
    assert_eq!(forged.status(), 403);
    assert!(forged.headers().get("set-cookie").is_none(), "no session for a forged login");
    let admin = hub.admin(Method::GET, "/admin/streams", Body::None).await;
    assert_eq!(admin.status, 200, "the admin API is unchanged");
}

/// Medians of `runs` in-browser loads of `url`: (bytes on the wire, decoded
/// bytes, ms to the last byte, ms from the last byte to the DOM complete).
async fn page_figures(browser: &Browser, url: &str, runs: usize) -> (f64, f64, f64, f64) {
    let mut figures = Vec::new();
    for _ in 0..runs {
        browser.goto(url).await;
        let script = "const n = performance.getEntriesByType('navigation')[0];
            return [n.transferSize, n.decodedBodySize, n.responseEnd - n.requestStart, n.domComplete - n.responseEnd];";
        let values = browser.client.execute(script, vec![]).await.expect("navigation timing");
        let values: Vec<f64> = values.as_array().expect("array").iter().map(|v| v.as_f64().unwrap_or(0.0)).collect();
        figures.push(values);
    }
    let median = |i: usize| {
        let mut column: Vec<f64> = figures.iter().map(|f| f[i]).collect();
        column.sort_by(f64::total_cmp);
        column[column.len() / 2]
    };
    (median(0), median(1), median(2), median(3))
}

/// Not a test: the figures of the console for a 10,000-leaf cascade (1,000
/// sessions in one tree, 10 receivers that take every subject), measured
/// in Chromium, and, with `CAEP_CONSOLE_SCREENSHOTS=dir`, the README's
/// screenshots. Run: `cargo test -p caep-integration-tests --test console
/// -- --ignored --nocapture` (add `--release` for a release-built hub).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, run by hand"]
async fn measure_the_console_on_a_10000_leaf_cascade() {
    const SESSIONS: usize = 1000;
    let hub = Hub::start().await;
    let idp = Idp::register(&hub, IDP).await;
    let ada = email("ada@example.com");
    let mut receivers = Vec::new();
    for name in ["payments", "mail", "calendar", "crm", "docs", "search", "billing", "storage", "chat", "tickets"] {
        receivers.push(Relying::new(&hub, name, true, &[SESSION_REVOKED], true).await);
    }
    let id = |i: usize| format!("agent-{i:04}");
    idp.establish(&hub, &id(0), &ada, None).await;
    for i in 1..SESSIONS {
        idp.establish(&hub, &id(i), &ada, Some(&id((i - 1) / 10))).await;
    }
    let revoke = idp.set(session_of(&id(0), &ada), SESSION_REVOKED, json!({"initiating_entity": "policy"}));
    idp.send(&hub, &revoke.with_txn("txn-10k")).await;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let report = hub.admin(Method::GET, "/admin/cascades/txn-10k?leaves=false", Body::None).await.json();
        if report["complete"] == true {
            assert_eq!(report["delivered"], (SESSIONS * receivers.len()) as u64, "{report}");
            break;
        }
        assert!(Instant::now() < deadline, "the cascade did not complete: {report}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let browser = Browser::start().await;
    browser.log_in(&format!("{}/console", hub.issuer), ADMIN_TOKEN).await;
    let cascade_url = format!("{}/console/cascades/txn-10k", hub.issuer);
    let (wire, decoded, to_last_byte, dom) = page_figures(&browser, &cascade_url, 5).await;
    println!(
        "cascade page, 10,000 leaves in 1,000 sessions (medians of 5 loads): {:.0} KiB on the wire, {:.0} KiB of HTML, \
         {to_last_byte:.0} ms request to last byte, {dom:.0} ms last byte to DOM complete",
        wire / 1024.0,
        decoded / 1024.0
    );
    assert_eq!(browser.count("tr.leaf.delivered").await, SESSIONS * receivers.len());
    let overview_url = format!("{}/console", hub.issuer);
    let (wire, _, to_last_byte, dom) = page_figures(&browser, &overview_url, 5).await;
    println!(
        "overview, 10 receivers: {:.0} KiB, {to_last_byte:.0} ms to last byte, {dom:.0} ms to DOM complete",
        wire / 1024.0
    );
    if let Ok(dir) = std::env::var("CAEP_CONSOLE_SCREENSHOTS") {
        for (url, file) in [(&cascade_url, "console-cascade.png"), (&overview_url, "console-overview.png")] {
            browser.goto(url).await;
            let png = browser.client.screenshot().await.expect("screenshot");
            std::fs::write(std::path::Path::new(&dir).join(file), png).expect("write screenshot");
        }
    }
}
