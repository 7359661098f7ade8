//! Tests of `streams.rs`, in a file of their own to keep that one short enough to read.

use super::*;
use caep_schemas::event::StreamStatus;
use caep_schemas::subject::{MAX_SUBJECT_BYTES, SubjectId};
use serde_json::json;
use std::path::PathBuf;

const SUPPORTED: [&str; 3] =
    ["urn:example:secevent:events:type_1", "urn:example:secevent:events:type_2", "urn:example:secevent:events:type_3"];
const SPEC_ID: &str = "f67e39a0a4d34d56b3aa1bc4cff0069f";
const ISS: &str = "https://tr.example.com";

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas/examples")
}

fn example(file: &str) -> Value {
    let text = std::fs::read_to_string(examples_dir().join(file)).expect("example file");
    serde_json::from_str(&text).expect("example is JSON")
}

/// The example files of `kind`, as `schemas/examples/index.json` lists them.
fn examples_of(kind: &str) -> Vec<(String, Value)> {
    let index = example("index.json");
    let entries = index.as_array().expect("index is an array");
    let files: Vec<(String, Value)> = entries
        .iter()
        .filter(|entry| entry["kind"] == kind)
        .map(|entry| {
            let file = entry["file"].as_str().expect("file name").to_owned();
            let value = example(&file);
            (file, value)
        })
        .collect();
    assert!(!files.is_empty(), "no examples of kind {kind}");
    files
}

fn spec_aud() -> Audience {
    Audience::Many(vec!["https://receiver.example.com/web".into(), "https://receiver.example.com/mobile".into()])
}

fn poll_url(stream_id: &str) -> String {
    format!("https://hub.example.com/ssf/poll/{stream_id}")
}

fn parse(body: Value, kind: RequestKind) -> Result<StreamRequest, SsfError> {
    parse_request(body.to_string().as_bytes(), kind)
}

fn bad_request(result: Result<impl fmt::Debug, SsfError>) -> String {
    match result {
        Err(SsfError::BadRequest(description)) => description,
        other => panic!("expected a 400, got {other:?}"),
    }
}

fn config(value: Value) -> StreamConfig {
    serde_json::from_value(value).expect("a stream configuration")
}

fn create(body: Value) -> StreamConfig {
    let request = parse(body, RequestKind::Create).expect("valid create");
    new_stream(SPEC_ID.into(), ISS, spec_aud(), request, &SUPPORTED, poll_url, 30)
}

/// PATCH or PUT `request` onto `existing`, as `kind` says.
fn apply(kind: RequestKind, existing: &StreamConfig, request: StreamRequest) -> Result<StreamConfig, SsfError> {
    match kind {
        RequestKind::Update => apply_update(existing, request, &SUPPORTED, poll_url),
        RequestKind::Replace => apply_replace(existing, request, &SUPPORTED, poll_url),
        RequestKind::Create => panic!("not an update"),
    }
}

fn push_stream() -> StreamConfig {
    config(example("ssf-18-read-stream-response.json"))
}

// --- stream ids

#[test]
fn stream_ids_are_128_bit_lowercase_hex() {
    let id = new_stream_id();
    assert_eq!(id.len(), 32);
    assert!(id.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)), "{id}");
    assert_ne!(id, new_stream_id());
}

// --- the spec's own examples

#[test]
fn spec_configurations_round_trip() {
    let mut all = examples_of("stream-configuration");
    for (file, list) in examples_of("stream-configuration-list") {
        let items = list.as_array().expect("a list").clone();
        all.extend(items.into_iter().map(|item| (file.clone(), item)));
    }
    for (file, value) in all {
        let parsed: StreamConfig =
            serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{file} does not parse: {e}"));
        assert_eq!(serde_json::to_value(&parsed).expect("serializes"), value, "{file}");
    }
}

#[test]
fn spec_request_examples_parse() {
    for (file, value) in examples_of("stream-configuration-request") {
        let body = value.to_string();
        let create = parse_request(body.as_bytes(), RequestKind::Create);
        assert!(create.is_ok(), "{file} as create: {create:?}");
        if value.get("stream_id").is_some() {
            for kind in [RequestKind::Update, RequestKind::Replace] {
                let request = parse_request(body.as_bytes(), kind).unwrap_or_else(|e| panic!("{file}: {e}"));
                assert_eq!(request.stream_id.as_deref(), Some(SPEC_ID), "{file}");
            }
        }
    }
}

#[test]
fn spec_create_example_gives_the_spec_response() {
    let created = create(example("ssf-16-create-stream-request.json"));
    let mut expected = example("ssf-17-create-stream-response.json");
    expected["min_verification_interval"] = json!(30);
    assert_eq!(serde_json::to_value(&created).expect("serializes"), expected);
}

#[test]
fn spec_update_example_gives_the_spec_response() {
    let request = parse(example("ssf-22-update-stream-request.json"), RequestKind::Update).expect("valid");
    let updated = apply_update(&push_stream(), request, &SUPPORTED, poll_url).expect("applies");
    assert_eq!(updated, config(example("ssf-23-update-stream-response.json")));
}

#[test]
fn spec_replace_example_gives_the_spec_response() {
    let request = parse(example("ssf-24-replace-stream-request.json"), RequestKind::Replace).expect("valid");
    let replaced = apply_replace(&push_stream(), request, &SUPPORTED, poll_url).expect("applies");
    assert_eq!(replaced, config(example("ssf-25-replace-stream-response.json")));
}

// --- create

#[test]
fn create_without_delivery_means_poll_at_the_transmitters_url() {
    let created = create(json!({"events_requested": [SUPPORTED[0]]}));
    assert_eq!(created.delivery, Delivery::Poll { endpoint_url: poll_url(SPEC_ID) });
    let json = serde_json::to_value(&created).expect("serializes");
    assert_eq!(json["delivery"], json!({"method": POLL_METHOD, "endpoint_url": poll_url(SPEC_ID)}));
    assert_eq!(created.iss, ISS);
    assert_eq!(created.aud, spec_aud());
    assert_eq!(created.min_verification_interval, Some(30));
    assert_eq!(created.inactivity_timeout, None);
}

#[test]
fn create_with_null_delivery_means_poll() {
    let created = create(json!({"delivery": null}));
    assert_eq!(created.delivery, Delivery::Poll { endpoint_url: poll_url(SPEC_ID) });
}

#[test]
fn a_receivers_poll_endpoint_url_is_ignored() {
    let created = create(json!({"delivery": {"method": POLL_METHOD, "endpoint_url": "https://evil.example/steal"}}));
    assert_eq!(created.delivery.endpoint_url(), poll_url(SPEC_ID));
}

#[test]
fn create_keeps_push_parameters() {
    let created = create(json!({"delivery": {
        "method": PUSH_METHOD,
        "endpoint_url": "https://rp.example/events",
        "authorization_header": "Bearer s3cr3t"
    }}));
    assert_eq!(
        created.delivery,
        Delivery::Push {
            endpoint_url: "https://rp.example/events".into(),
            authorization_header: Some("Bearer s3cr3t".into())
        }
    );
}

#[test]
fn create_ignores_transmitter_supplied_members_and_unknown_ones() {
    let created = create(json!({
        "stream_id": "chosen-by-receiver",
        "iss": "https://someone-else.example",
        "aud": "another-receiver",
        "events_delivered": ["urn:x"],
        "min_verification_interval": 1,
        "format": "email",
        "x-extension": {"anything": true}
    }));
    assert_eq!(created.stream_id, SPEC_ID);
    assert_eq!(created.iss, ISS);
    assert_eq!(created.aud, spec_aud());
    assert_eq!(created.events_delivered, Vec::<String>::new());
    assert_eq!(created.min_verification_interval, Some(30));
}

#[test]
fn unsupported_delivery_method_is_a_clear_400() {
    let description =
        bad_request(parse(json!({"delivery": {"method": "urn:example:smoke-signals"}}), RequestKind::Create));
    assert!(description.contains("unsupported delivery method `urn:example:smoke-signals`"), "{description}");
    assert!(description.contains(PUSH_METHOD) && description.contains(POLL_METHOD), "{description}");
}

#[test]
fn a_huge_method_is_not_reflected_whole() {
    let method = "x".repeat(10_000);
    let description = bad_request(parse(json!({"delivery": {"method": method}}), RequestKind::Create));
    assert!(description.len() < 400, "{description}");
}

#[test]
fn delivery_must_name_a_method() {
    let description = bad_request(parse(json!({"delivery": {}}), RequestKind::Create));
    assert!(description.contains("`delivery.method` is required"), "{description}");
    let description = bad_request(parse(
        json!({"delivery": {"delivery_method": PUSH_METHOD, "url": "https://rp.example/e"}}),
        RequestKind::Create,
    ));
    assert!(description.contains("pre-1.0"), "{description}");
    bad_request(parse(json!({"delivery": {"method": 8935}}), RequestKind::Create));
    bad_request(parse(json!({"delivery": "push"}), RequestKind::Create));
}

#[test]
fn push_needs_an_absolute_http_endpoint_url() {
    let description = bad_request(parse(json!({"delivery": {"method": PUSH_METHOD}}), RequestKind::Create));
    assert!(description.contains("endpoint_url"), "{description}");
    for url in [
        json!(null),
        json!(42),
        json!(""),
        json!("/relative"),
        json!("ftp://rp.example/x"),
        json!("https://"),
        json!("https:///path"),
        json!("https://rp.example/a b"),
        json!("https://rp.example/\n"),
    ] {
        bad_request(parse(json!({"delivery": {"method": PUSH_METHOD, "endpoint_url": url}}), RequestKind::Create));
    }
    for url in ["https://rp.example", "http://127.0.0.1:8080/events?x=1", "https://rp.example:8443/ssf#frag"] {
        parse(json!({"delivery": {"method": PUSH_METHOD, "endpoint_url": url}}), RequestKind::Create)
            .unwrap_or_else(|e| panic!("{url}: {e}"));
    }
}

#[test]
fn authorization_header_must_be_a_valid_header_value() {
    for header in [json!(7), json!("Bearer x\r\nX-Injected: 1"), json!(["Bearer x"])] {
        let body = json!({"delivery": {
            "method": PUSH_METHOD, "endpoint_url": "https://rp.example/e", "authorization_header": header
        }});
        bad_request(parse(body, RequestKind::Create));
    }
}

#[test]
fn broken_or_non_object_bodies_are_400() {
    for body in [&b"{"[..], b"", b"not json", b"[]", b"\"text\"", b"42", b"null"] {
        for kind in [RequestKind::Create, RequestKind::Replace, RequestKind::Update] {
            bad_request(parse_request(body, kind));
        }
    }
}

#[test]
fn an_empty_event_type_is_refused() {
    let description = bad_request(parse(json!({"events_requested": [""]}), RequestKind::Create));
    assert!(description.contains("non-empty"), "{description}");
}

#[test]
fn member_types_are_checked() {
    bad_request(parse(json!({"events_requested": "urn:x"}), RequestKind::Create));
    bad_request(parse(json!({"events_requested": ["urn:x", 3]}), RequestKind::Create));
    bad_request(parse(json!({"description": 5}), RequestKind::Create));
}

#[test]
fn long_descriptions_are_truncated() {
    let created = create(json!({"description": "é".repeat(MAX_DESCRIPTION_CHARS + 10)}));
    assert_eq!(created.description.expect("kept").chars().count(), MAX_DESCRIPTION_CHARS);
}

// --- events_delivered

#[test]
fn events_delivered_is_the_intersection_in_supported_order() {
    let requested = vec![SUPPORTED[2].to_owned(), "urn:unknown".to_owned(), SUPPORTED[0].to_owned()];
    assert_eq!(events_delivered(&SUPPORTED, Some(&requested)), vec![SUPPORTED[0], SUPPORTED[2]]);
    assert_eq!(events_delivered(&SUPPORTED, Some(&[])), Vec::<String>::new());
    assert_eq!(events_delivered(&SUPPORTED, None), Vec::<String>::new());
}

#[test]
fn without_events_requested_nothing_is_delivered() {
    let created = create(json!({}));
    assert_eq!(created.events_requested, None);
    assert!(created.events_delivered.is_empty());
    let json = serde_json::to_value(&created).expect("serializes");
    assert!(json.get("events_requested").is_none());
    assert_eq!(json["events_delivered"], json!([]), "events_delivered is REQUIRED, even empty");
}

#[test]
fn unknown_requested_events_are_kept_but_not_delivered() {
    let created = create(json!({"events_requested": ["urn:unknown", SUPPORTED[1]]}));
    assert_eq!(created.events_requested, Some(vec!["urn:unknown".to_owned(), SUPPORTED[1].to_owned()]));
    assert_eq!(created.events_delivered, vec![SUPPORTED[1]]);
}

// --- update (PATCH) and replace (PUT)

#[test]
fn update_and_replace_need_a_stream_id() {
    for kind in [RequestKind::Update, RequestKind::Replace] {
        let description = bad_request(parse(json!({"description": "x"}), kind));
        assert!(description.contains("`stream_id` is required"), "{description}");
        bad_request(parse(json!({"stream_id": 7}), kind));
        bad_request(parse(json!({"stream_id": ""}), kind));
        bad_request(parse(json!({"stream_id": null}), kind));
    }
}

#[test]
fn update_changes_only_the_members_present() {
    let existing = push_stream();
    let request = parse(json!({"stream_id": SPEC_ID, "description": "renamed"}), RequestKind::Update).expect("valid");
    let updated = apply_update(&existing, request, &SUPPORTED, poll_url).expect("applies");
    assert_eq!(updated.description.as_deref(), Some("renamed"));
    assert_eq!(updated.delivery, existing.delivery);
    assert_eq!(updated.events_requested, existing.events_requested);
    assert_eq!(updated.events_delivered, existing.events_delivered);
    assert_eq!(updated.iss, existing.iss);
    assert_eq!(updated.aud, existing.aud);
}

#[test]
fn update_with_null_removes_a_member() {
    let request =
        parse(json!({"stream_id": SPEC_ID, "description": null, "events_requested": null}), RequestKind::Update)
            .expect("valid");
    let updated = apply_update(&push_stream(), request, &SUPPORTED, poll_url).expect("applies");
    assert_eq!(updated.description, None);
    assert_eq!(updated.events_requested, None);
    assert!(updated.events_delivered.is_empty());
}

#[test]
fn update_can_switch_push_to_poll_and_back() {
    let request =
        parse(json!({"stream_id": SPEC_ID, "delivery": {"method": POLL_METHOD}}), RequestKind::Update).expect("valid");
    let polled = apply_update(&push_stream(), request, &SUPPORTED, poll_url).expect("applies");
    assert_eq!(polled.delivery, Delivery::Poll { endpoint_url: poll_url(SPEC_ID) });

    let request = parse(json!({"stream_id": SPEC_ID, "delivery": null}), RequestKind::Update).expect("valid");
    let defaulted = apply_update(&push_stream(), request, &SUPPORTED, poll_url).expect("applies");
    assert_eq!(defaulted.delivery, Delivery::Poll { endpoint_url: poll_url(SPEC_ID) });

    let body =
        json!({"stream_id": SPEC_ID, "delivery": {"method": PUSH_METHOD, "endpoint_url": "https://rp.example/new"}});
    let request = parse(body, RequestKind::Update).expect("valid");
    let pushed = apply_update(&polled, request, &SUPPORTED, poll_url).expect("applies");
    assert_eq!(
        pushed.delivery,
        Delivery::Push { endpoint_url: "https://rp.example/new".into(), authorization_header: None }
    );
}

#[test]
fn a_new_delivery_object_replaces_the_old_one_whole() {
    let mut existing = push_stream();
    existing.delivery = Delivery::Push {
        endpoint_url: "https://receiver.example.com/events".into(),
        authorization_header: Some("Bearer old".into()),
    };
    let body =
        json!({"stream_id": SPEC_ID, "delivery": {"method": PUSH_METHOD, "endpoint_url": "https://rp.example/new"}});
    let updated = apply_update(&existing, parse(body, RequestKind::Update).expect("valid"), &SUPPORTED, poll_url)
        .expect("applies");
    assert_eq!(
        updated.delivery,
        Delivery::Push { endpoint_url: "https://rp.example/new".into(), authorization_header: None }
    );
}

#[test]
fn replace_removes_missing_receiver_supplied_members() {
    let request = parse(json!({"stream_id": SPEC_ID}), RequestKind::Replace).expect("valid");
    let replaced = apply_replace(&push_stream(), request, &SUPPORTED, poll_url).expect("applies");
    assert_eq!(replaced.description, None);
    assert_eq!(replaced.events_requested, None);
    assert!(replaced.events_delivered.is_empty());
    assert_eq!(replaced.delivery, Delivery::Poll { endpoint_url: poll_url(SPEC_ID) });
    assert_eq!(replaced.stream_id, SPEC_ID);
    assert_eq!(replaced.iss, ISS);
    assert_eq!(replaced.aud, spec_aud());
}

#[test]
fn update_and_replace_recompute_against_the_current_supported_list() {
    let now_supported = [SUPPORTED[0], SUPPORTED[1], SUPPORTED[2], "urn:example:secevent:events:type_4"];
    let body = json!({"stream_id": SPEC_ID});
    let updated = apply_update(
        &push_stream(),
        parse(body.clone(), RequestKind::Update).expect("valid"),
        &now_supported,
        poll_url,
    )
    .expect("applies");
    assert_eq!(updated.events_supported.len(), 4);
    assert_eq!(updated.events_delivered, vec![SUPPORTED[1], SUPPORTED[2], now_supported[3]]);
}

#[test]
fn echoed_transmitter_supplied_members_that_match_are_accepted() {
    let mut existing = push_stream();
    existing.min_verification_interval = Some(30);
    let body = json!({
        "stream_id": SPEC_ID,
        "iss": ISS,
        // Same audiences, other order.
        "aud": ["https://receiver.example.com/mobile", "https://receiver.example.com/web"],
        "events_supported": [SUPPORTED[2], SUPPORTED[1], SUPPORTED[0]],
        "events_delivered": [SUPPORTED[2], SUPPORTED[1]],
        "min_verification_interval": 30,
        "inactivity_timeout": null,
        "description": "echoed back"
    });
    for kind in [RequestKind::Update, RequestKind::Replace] {
        let request = parse(body.clone(), kind).expect("valid");
        assert_eq!(request.transmitter_supplied.len(), 6);
        apply(kind, &existing, request).expect("matching echoes are accepted");
    }
}

#[test]
fn a_single_audience_matches_its_string_or_one_element_array() {
    let mut existing = push_stream();
    existing.aud = Audience::One("rp-1".into());
    for aud in [json!("rp-1"), json!(["rp-1"])] {
        let request = parse(json!({"stream_id": SPEC_ID, "aud": aud}), RequestKind::Update).expect("valid");
        apply_update(&existing, request, &SUPPORTED, poll_url).expect("matches");
    }
}

#[test]
fn echoed_transmitter_supplied_members_that_differ_are_400() {
    let mismatches = [
        ("iss", json!("https://other.example")),
        ("aud", json!("https://receiver.example.com/web")),
        ("aud", json!(["https://receiver.example.com/web", "https://attacker.example"])),
        ("events_supported", json!([SUPPORTED[0]])),
        // The value before the update, not after: the request below asks
        // for type_1 only, but events_delivered must match the current one.
        ("events_delivered", json!([SUPPORTED[0]])),
        ("events_delivered", json!("not-a-list")),
        ("min_verification_interval", json!(5)),
        ("inactivity_timeout", json!(600)),
    ];
    for (key, value) in mismatches {
        let mut body = json!({"stream_id": SPEC_ID, "events_requested": [SUPPORTED[0]]});
        body[key] = value.clone();
        for kind in [RequestKind::Update, RequestKind::Replace] {
            let request = parse(body.clone(), kind).expect("parses");
            let description = bad_request(apply(kind, &push_stream(), request));
            assert!(description.contains(&format!("`{key}`")), "{key}={value}: {description}");
        }
    }
}

#[test]
fn a_request_for_another_stream_is_refused() {
    let request = parse(json!({"stream_id": "someone-elses"}), RequestKind::Update).expect("valid");
    bad_request(apply_update(&push_stream(), request, &SUPPORTED, poll_url));
    let create_request = parse(json!({}), RequestKind::Create).expect("valid");
    bad_request(apply_replace(&push_stream(), create_request, &SUPPORTED, poll_url));
}

// --- secrets

#[test]
fn debug_never_shows_the_authorization_header() {
    let body = json!({"stream_id": SPEC_ID, "delivery": {
        "method": PUSH_METHOD, "endpoint_url": "https://rp.example/e", "authorization_header": "Bearer s3cr3t"
    }});
    let request = parse(body, RequestKind::Update).expect("valid");
    let printed = format!("{request:?}");
    assert!(!printed.contains("s3cr3t") && printed.contains("<redacted>"), "{printed}");
    let updated = apply_update(&push_stream(), request, &SUPPORTED, poll_url).expect("applies");
    for printed in [format!("{updated:?}"), format!("{:?}", updated.delivery), format!("{updated:#?}")] {
        assert!(!printed.contains("s3cr3t") && printed.contains("<redacted>"), "{printed}");
    }
}

#[test]
fn the_configuration_returns_the_authorization_header_to_its_owner() {
    let created = create(json!({"delivery": {
        "method": PUSH_METHOD, "endpoint_url": "https://rp.example/e", "authorization_header": "Bearer s3cr3t"
    }}));
    let json = serde_json::to_value(&created).expect("serializes");
    assert_eq!(json["delivery"]["authorization_header"], "Bearer s3cr3t");
    // and a read-modify-replace with that body keeps it.
    let mut body = json.clone();
    body["description"] = json!("edited");
    let replaced = apply_replace(&created, parse(body, RequestKind::Replace).expect("valid"), &SUPPORTED, poll_url)
        .expect("the echoed configuration matches");
    assert_eq!(replaced.delivery, created.delivery);
    assert_eq!(replaced.description.as_deref(), Some("edited"));
}

// --- stored configuration parsing

#[test]
fn stored_delivery_needs_a_known_method_and_an_endpoint() {
    let mut value = example("ssf-18-read-stream-response.json");
    value["delivery"] = json!({"method": "urn:example:other", "endpoint_url": "https://x"});
    assert!(serde_json::from_value::<StreamConfig>(value.clone()).is_err());
    value["delivery"] = json!({"method": POLL_METHOD});
    assert!(serde_json::from_value::<StreamConfig>(value).is_err());
}

#[test]
fn aud_is_a_non_empty_string_or_array() {
    let mut value = example("ssf-18-read-stream-response.json");
    value["aud"] = json!("rp-1");
    assert_eq!(config(value.clone()).aud, Audience::One("rp-1".into()));
    assert_eq!(serde_json::to_value(config(value.clone())).expect("serializes")["aud"], "rp-1");
    for bad in [json!(""), json!([]), json!([""]), json!(3)] {
        value["aud"] = bad;
        assert!(serde_json::from_value::<StreamConfig>(value.clone()).is_err());
    }
}

// --- status

#[test]
fn status_update_examples_parse() {
    let plain =
        parse_status_update(json!({"stream_id": SPEC_ID, "status": "paused"}).to_string().as_bytes()).expect("valid");
    assert_eq!(plain, StatusBody { stream_id: SPEC_ID.into(), status: StreamStatus::Paused, reason: None });
    let body = json!({"stream_id": SPEC_ID, "status": "paused", "reason": "Disabled by administrator action."});
    let with_reason = parse_status_update(body.to_string().as_bytes()).expect("valid");
    assert_eq!(with_reason.reason.as_deref(), Some("Disabled by administrator action."));
    // The response echoes the same fields.
    assert_eq!(serde_json::to_value(&with_reason).expect("serializes"), body);
    assert_eq!(serde_json::to_value(&plain).expect("serializes"), json!({"stream_id": SPEC_ID, "status": "paused"}));
    for status in ["enabled", "disabled"] {
        parse_status_update(json!({"stream_id": SPEC_ID, "status": status}).to_string().as_bytes()).expect("valid");
    }
}

#[test]
fn the_spec_status_read_response_parses() {
    let body = json!({"stream_id": SPEC_ID, "status": "paused", "reason": "SYSTEM_DOWN_FOR_MAINTENANCE"});
    let parsed: StatusBody = serde_json::from_value(body).expect("valid");
    assert_eq!(parsed.status, StreamStatus::Paused);
}

#[test]
fn bad_status_bodies_are_400() {
    let description =
        bad_request(parse_status_update(json!({"stream_id": SPEC_ID, "status": "stopped"}).to_string().as_bytes()));
    assert!(description.contains("enabled") && description.contains("disabled"), "{description}");
    for body in [
        json!({"stream_id": SPEC_ID, "status": "Enabled"}),
        json!({"stream_id": SPEC_ID, "status": 1}),
        json!({"stream_id": SPEC_ID}),
        json!({"stream_id": SPEC_ID, "status": null}),
        json!({"status": "enabled"}),
        json!({"stream_id": SPEC_ID, "status": "enabled", "reason": 3}),
        json!(["enabled"]),
    ] {
        bad_request(parse_status_update(body.to_string().as_bytes()));
    }
    bad_request(parse_status_update(b"{oops"));
}

// --- subjects

#[test]
fn the_spec_add_subject_example_parses() {
    let body = json!({
        "stream_id": SPEC_ID,
        "subject": {"format": "email", "email": "example.user@example.com"},
        "verified": true
    });
    let request = parse_subject_request(body.to_string().as_bytes()).expect("valid");
    assert_eq!(request.subject, SubjectId::email("example.user@example.com"));
    assert_eq!(request.verified, Some(true));
    assert_eq!(serde_json::to_value(&request).expect("serializes"), body);
}

#[test]
fn add_many_takes_one_to_a_hundred_known_subjects() {
    let session = |n: usize| json!({"format": "complex", "session": {"format": "opaque", "id": format!("s{n}")}});
    let body = json!({"stream_id": SPEC_ID, "subjects": [session(1), session(2)]});
    let request = parse_subjects_request(body.to_string().as_bytes()).expect("valid");
    assert_eq!(request.subjects.len(), 2);
    assert_eq!(request.stream_id, SPEC_ID);
    let refused = [
        json!({"stream_id": SPEC_ID}),
        json!({"stream_id": SPEC_ID, "subjects": []}),
        json!({"stream_id": SPEC_ID, "subjects": session(1)}),
        json!({"stream_id": SPEC_ID, "subjects": [session(1), "s2"]}),
        json!({"stream_id": SPEC_ID, "subjects": [{"format": "x-unknown", "id": "s"}]}),
        json!({"stream_id": SPEC_ID, "subjects": (0..=MAX_SUBJECTS_PER_CALL).map(session).collect::<Vec<_>>()}),
        json!({"subjects": [session(1)]}),
    ];
    for body in refused {
        let error = parse_subjects_request(body.to_string().as_bytes()).expect_err("refused");
        assert!(matches!(error, SsfError::BadRequest(_)), "{body}: {error:?}");
    }
}

#[test]
fn verified_defaults_to_true() {
    let body = json!({"stream_id": SPEC_ID, "subject": {"format": "opaque", "id": "abc"}});
    let request = parse_subject_request(body.to_string().as_bytes()).expect("valid");
    assert_eq!(request.verified, None);
    assert!(request.is_verified());
    let body = json!({"stream_id": SPEC_ID, "subject": {"format": "opaque", "id": "abc"}, "verified": false});
    assert!(!parse_subject_request(body.to_string().as_bytes()).expect("valid").is_verified());
}

#[test]
fn complex_subjects_of_known_formats_parse() {
    let body = json!({"stream_id": SPEC_ID, "subject": {
        "format": "complex",
        "session": {"format": "opaque", "id": "s-1"},
        "user": {"format": "iss_sub", "iss": "https://idp.example.com/", "sub": "u-1"}
    }});
    let request = parse_subject_request(body.to_string().as_bytes()).expect("valid");
    assert!(request.subject.as_complex().is_some());
}

#[test]
fn bad_subject_requests_are_400() {
    // The spec's own remove example uses `phone`, which is not an RFC
    // 9493 format (that is `phone_number`).
    let description = bad_request(parse_subject_request(
        json!({"stream_id": SPEC_ID, "subject": {"format": "phone", "phone_number": "+12065550123"}})
            .to_string()
            .as_bytes(),
    ));
    assert!(description.contains("unsupported subject format `phone`"), "{description}");
    for body in [
        json!({"stream_id": SPEC_ID, "subject": {"email": "a@example.com"}}),
        json!({"stream_id": SPEC_ID, "subject": {"format": "email"}}),
        json!({"stream_id": SPEC_ID, "subject": {"format": 7, "email": "a@example.com"}}),
        json!({"stream_id": SPEC_ID, "subject": {"format": "complex"}}),
        json!({"stream_id": SPEC_ID, "subject": {"format": "complex",
            "device": {"format": "catalog_item", "catalog_id": "c1"}}}),
        json!({"stream_id": SPEC_ID, "subject": {"format": "aliases",
            "identifiers": [{"format": "made_up", "x": "y"}]}}),
        json!({"stream_id": SPEC_ID, "subject": "a@example.com"}),
        json!({"stream_id": SPEC_ID}),
        json!({"stream_id": SPEC_ID, "subject": null}),
        json!({"subject": {"format": "email", "email": "a@example.com"}}),
        json!({"stream_id": SPEC_ID, "subject": {"format": "email", "email": "a@example.com"}, "verified": "yes"}),
    ] {
        bad_request(parse_subject_request(body.to_string().as_bytes()));
    }
    bad_request(parse_subject_request(b"[]"));
}

// --- verification

#[test]
fn the_spec_verification_example_parses() {
    let body = json!({"stream_id": SPEC_ID, "state": "VGhpcyBpcyBhbiBleGFtcGxlIHN0YXRlIHZhbHVlLgo="});
    let request = parse_verification_request(body.to_string().as_bytes()).expect("valid");
    assert_eq!(request.state.as_deref(), Some("VGhpcyBpcyBhbiBleGFtcGxlIHN0YXRlIHZhbHVlLgo="));
    assert_eq!(serde_json::to_value(&request).expect("serializes"), body);
}

#[test]
fn verification_state_is_optional_but_a_string() {
    for body in [json!({"stream_id": SPEC_ID}), json!({"stream_id": SPEC_ID, "state": null})] {
        let request = parse_verification_request(body.to_string().as_bytes()).expect("valid");
        assert_eq!(request.state, None);
    }
    bad_request(parse_verification_request(json!({"stream_id": SPEC_ID, "state": 1}).to_string().as_bytes()));
    bad_request(parse_verification_request(json!({"state": "x"}).to_string().as_bytes()));
    bad_request(parse_verification_request(b"not json"));
}

#[test]
fn a_subject_identifier_larger_than_the_bound_is_refused() {
    let body = |id: &str| json!({"stream_id": "s", "subject": {"format": "opaque", "id": id}}).to_string();
    let fits = "x".repeat(MAX_SUBJECT_BYTES - 64);
    assert!(parse_subject_request(body(&fits).as_bytes()).is_ok());
    let huge = "x".repeat(MAX_SUBJECT_BYTES);
    let refused = parse_subject_request(body(&huge).as_bytes());
    assert!(matches!(&refused, Err(SsfError::BadRequest(why)) if why.contains("at most 2048")), "{refused:?}");
    let many =
        json!({"stream_id": "s", "subjects": [{"format": "opaque", "id": "ok"}, {"format": "opaque", "id": huge}]});
    assert!(
        matches!(parse_subjects_request(many.to_string().as_bytes()), Err(SsfError::BadRequest(_))),
        "one in a batch"
    );
}
