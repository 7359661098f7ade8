//! The SSF 1.0 transmitter checked the way the OpenID SSF transmitter
//! conformance plan checks one: a real hub on loopback (in-process, real redb
//! file), endpoints discovered from its metadata, a receiver's bearer token
//! on every management call, and SETs received for real (push receivers that
//! record every request, RFC 8936 polls) and verified against the hub's JWKS.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use caep_schemas::json_schema;
use caep_schemas::set::{Expectations, SecurityEventToken, SetError};
use reqwest::Method;
use serde_json::{Value, json};
use support::{
    ACCOUNT_DISABLED, ADMIN_TOKEN, Answer, Body, CREDENTIAL_CHANGE, Hub, HubOptions, POLL, PUSH, PushReceiver,
    SESSION_REVOKED, STREAM_UPDATED, TICK, WAIT, assert_push_request, assert_stream_subject, assert_valid,
    assert_verification,
};

#[path = "transmitter/delivery.rs"]
mod delivery;
use delivery::*;

/// A stream id no receiver owns.
const UNKNOWN_STREAM: &str = "0123456789abcdef0123456789abcdef";

fn string_set(value: &Value) -> BTreeSet<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {value}"))
        .iter()
        .map(|item| item.as_str().expect("string").to_owned())
        .collect()
}

fn sorted(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// `sets` of a poll response as (jti, token) pairs.
fn polled(response: &Value) -> Vec<(String, String)> {
    response["sets"]
        .as_object()
        .expect("sets object")
        .iter()
        .map(|(jti, token)| (jti.clone(), token.as_str().expect("SET is a string").to_owned()))
        .collect()
}

// ---------------------------------------------------------------- metadata

async fn metadata_advertises_absolute_endpoints_under_the_issuer(base: HubOptions) {
    let hub = Hub::start_with(base.clone()).await;
    let metadata = &hub.metadata;
    assert_eq!(metadata["spec_version"], "1_0");
    assert_eq!(metadata["issuer"], hub.issuer);
    let base = format!("{}/", hub.issuer);
    for name in [
        "jwks_uri",
        "configuration_endpoint",
        "status_endpoint",
        "add_subject_endpoint",
        "remove_subject_endpoint",
        "add_subjects_endpoint",
        "verification_endpoint",
    ] {
        let url = hub.endpoint(name);
        assert!(url.starts_with(&base) && url.len() > base.len(), "{name} = {url} is not under {base}");
    }
    assert_eq!(string_set(&metadata["delivery_methods_supported"]), sorted(&[PUSH, POLL]));
    assert!(
        metadata["authorization_schemes"]
            .as_array()
            .expect("authorization_schemes")
            .iter()
            .any(|scheme| scheme["spec_urn"] == "urn:ietf:rfc:6749"),
        "{metadata}"
    );
    // Empty arrays are omitted (SSF 1.0 §7.1).
    for (name, value) in metadata.as_object().expect("object") {
        if let Value::Array(items) = value {
            assert!(!items.is_empty(), "{name} is an empty array");
        }
    }
    assert_valid(json_schema::TRANSMITTER_METADATA_SCHEMA_ID, metadata);

    // The JWKS: public keys only, each with a kid, served as a JWK set.
    let jwks = hub.send(Method::GET, &hub.endpoint("jwks_uri"), None, Body::None).await.expect(200);
    assert_eq!(jwks.header("content-type"), Some("application/jwk-set+json"));
    let keys = jwks.json()["keys"].as_array().expect("keys").clone();
    assert!(!keys.is_empty());
    for key in &keys {
        assert!(key["kid"].as_str().is_some_and(|kid| !kid.is_empty()), "{key}");
        for private in ["d", "p", "q", "dp", "dq", "qi"] {
            assert!(key.get(private).is_none(), "private member {private} published: {key}");
        }
    }
    assert_eq!(hub.jwks.len(), keys.len());
}

// ---------------------------------------------------------------- stream lifecycle

async fn push_stream_lifecycle_create_read_list_update_replace_delete(base: HubOptions) {
    let hub = Hub::start_with(base.clone()).await;
    let rp = hub.receiver("lifecycle").await;
    let receiver = PushReceiver::accepting().await;
    let streams = hub.endpoint("configuration_endpoint");

    // A receiver without streams lists none.
    let listed = hub.get(&streams, &rp.token).await.expect(200).no_store();
    assert_eq!(listed.json(), json!([]));

    let unknown_event = "urn:example:secevent:unknown-event";
    let created = hub
        .create_stream(
            &rp,
            json!({
                "delivery": {"method": PUSH, "endpoint_url": receiver.url, "authorization_header": "Bearer rp-secret"},
                "events_requested": [SESSION_REVOKED, CREDENTIAL_CHANGE, unknown_event],
                "description": "lifecycle stream",
            }),
        )
        .await;
    let stream_id = created["stream_id"].as_str().expect("stream_id").to_owned();
    assert!(!stream_id.is_empty());
    assert!(
        stream_id.chars().all(|c| c.is_ascii_alphanumeric() || "-._~".contains(c)),
        "stream_id {stream_id} is not made of RFC 3986 unreserved characters"
    );
    assert_eq!(created["iss"], hub.issuer);
    assert_eq!(created["aud"], rp.audience);
    let supported = string_set(&created["events_supported"]);
    assert!(supported.contains(SESSION_REVOKED) && supported.contains(CREDENTIAL_CHANGE), "{supported:?}");
    assert!(!supported.contains(unknown_event));
    assert_eq!(string_set(&created["events_delivered"]), sorted(&[SESSION_REVOKED, CREDENTIAL_CHANGE]));
    assert_eq!(
        created["delivery"],
        json!({"method": PUSH, "endpoint_url": receiver.url, "authorization_header": "Bearer rp-secret"})
    );
    assert_eq!(created["description"], "lifecycle stream");

    // Read one, and list.
    let read = hub.get(&hub.stream_url(&stream_id), &rp.token).await.expect(200).no_store();
    assert_eq!(read.json(), created);
    let listed = hub.get(&streams, &rp.token).await.expect(200).no_store();
    assert_eq!(listed.json(), json!([created.clone()]));

    // PATCH: only the members present change.
    let patched = hub
        .patch(&streams, &rp.token, json!({"stream_id": stream_id, "description": "patched"}))
        .await
        .expect(200)
        .no_store()
        .json();
    assert_valid(json_schema::STREAM_CONFIGURATION_SCHEMA_ID, &patched);
    assert_eq!(patched["description"], "patched");
    for unchanged in ["stream_id", "iss", "aud", "delivery", "events_requested", "events_delivered"] {
        assert_eq!(patched[unchanged], created[unchanged], "PATCH changed {unchanged}");
    }
    let patched = hub
        .patch(&streams, &rp.token, json!({"stream_id": stream_id, "events_requested": [ACCOUNT_DISABLED]}))
        .await
        .expect(200)
        .no_store()
        .json();
    assert_eq!(patched["description"], "patched", "description not in the PATCH, so unchanged");
    assert_eq!(patched["delivery"], created["delivery"]);
    assert_eq!(string_set(&patched["events_delivered"]), sorted(&[ACCOUNT_DISABLED]));
    assert_eq!(hub.get(&hub.stream_url(&stream_id), &rp.token).await.expect(200).json(), patched);

    // PUT: receiver-supplied members not given are removed.
    let replaced = hub
        .put(
            &streams,
            &rp.token,
            json!({
                "stream_id": stream_id,
                "delivery": {"method": PUSH, "endpoint_url": receiver.url},
                "events_requested": [SESSION_REVOKED],
            }),
        )
        .await
        .expect(200)
        .no_store()
        .json();
    assert_valid(json_schema::STREAM_CONFIGURATION_SCHEMA_ID, &replaced);
    assert_eq!(replaced["stream_id"], stream_id);
    assert_eq!(replaced["iss"], hub.issuer);
    assert_eq!(replaced["aud"], rp.audience);
    assert_eq!(replaced["delivery"], json!({"method": PUSH, "endpoint_url": receiver.url}));
    assert_eq!(string_set(&replaced["events_delivered"]), sorted(&[SESSION_REVOKED]));
    assert!(replaced.get("description").is_none(), "PUT without description keeps it: {replaced}");
    assert_eq!(hub.get(&hub.stream_url(&stream_id), &rp.token).await.expect(200).json(), replaced);

    // DELETE, then it is gone.
    let deleted = hub.delete(&hub.stream_url(&stream_id), &rp.token).await.expect(204).no_store();
    assert!(deleted.text.is_empty(), "204 with a body: {}", deleted.text);
    hub.get(&hub.stream_url(&stream_id), &rp.token).await.expect(404).no_store();
    assert_eq!(hub.get(&streams, &rp.token).await.expect(200).json(), json!([]));
    hub.get(&hub.status_url(&stream_id), &rp.token).await.expect(404).no_store();
}

async fn poll_stream_lifecycle_with_a_transmitter_supplied_endpoint(base: HubOptions) {
    let hub = Hub::start_with(base.clone()).await;
    let rp = hub.receiver("poller").await;
    let streams = hub.endpoint("configuration_endpoint");

    // No `delivery`: poll, with the transmitter's endpoint.
    let created = hub.create_stream(&rp, json!({"events_requested": [SESSION_REVOKED, "urn:example:nope"]})).await;
    let stream_id = created["stream_id"].as_str().expect("stream_id").to_owned();
    assert_eq!(created["iss"], hub.issuer);
    assert_eq!(created["aud"], rp.audience);
    assert_eq!(created["delivery"]["method"], POLL);
    let poll_url = created["delivery"]["endpoint_url"].as_str().expect("poll endpoint_url").to_owned();
    assert!(poll_url.starts_with(&format!("{}/", hub.issuer)), "poll endpoint {poll_url} not under the issuer");
    assert_eq!(string_set(&created["events_delivered"]), sorted(&[SESSION_REVOKED]));

    // The endpoint works: nothing queued yet.
    let empty = hub.poll(&rp, &poll_url, json!({"returnImmediately": true})).await;
    assert_eq!(empty, json!({"sets": {}, "moreAvailable": false}));

    // A receiver-supplied poll endpoint_url is ignored: the transmitter sets it.
    let patched = hub
        .patch(
            &streams,
            &rp.token,
            json!({"stream_id": stream_id, "delivery": {"method": POLL, "endpoint_url": "https://rp.example/poll"}}),
        )
        .await
        .expect(200)
        .json();
    assert_eq!(patched["delivery"], json!({"method": POLL, "endpoint_url": poll_url}));

    // PUT without delivery keeps poll (the create default).
    let replaced = hub.put(&streams, &rp.token, json!({"stream_id": stream_id})).await.expect(200).json();
    assert_eq!(replaced["delivery"], json!({"method": POLL, "endpoint_url": poll_url}));
    assert_eq!(replaced["events_delivered"], json!([]));

    hub.delete(&hub.stream_url(&stream_id), &rp.token).await.expect(204).no_store();
    hub.post(&poll_url, &rp.token, json!({"returnImmediately": true})).await.expect(404).no_store();
    hub.get(&hub.stream_url(&stream_id), &rp.token).await.expect(404);
}

// ---------------------------------------------------------------- authorization

/// Every management operation on `stream_id`, as (name, method, URL, body).
fn operations(hub: &Hub, stream_id: &str, poll_url: &str) -> Vec<(&'static str, Method, String, Option<Value>)> {
    let streams = hub.endpoint("configuration_endpoint");
    let subject = json!({"format": "email", "email": "user@example.com"});
    vec![
        ("create", Method::POST, streams.clone(), Some(json!({"events_requested": [SESSION_REVOKED]}))),
        ("read", Method::GET, hub.stream_url(stream_id), None),
        ("list", Method::GET, streams.clone(), None),
        ("update", Method::PATCH, streams.clone(), Some(json!({"stream_id": stream_id, "description": "x"}))),
        ("replace", Method::PUT, streams.clone(), Some(json!({"stream_id": stream_id}))),
        ("delete", Method::DELETE, hub.stream_url(stream_id), None),
        ("status read", Method::GET, hub.status_url(stream_id), None),
        (
            "status update",
            Method::POST,
            hub.endpoint("status_endpoint"),
            Some(json!({"stream_id": stream_id, "status": "paused"})),
        ),
        (
            "add subject",
            Method::POST,
            hub.endpoint("add_subject_endpoint"),
            Some(json!({"stream_id": stream_id, "subject": subject})),
        ),
        (
            "add many subjects",
            Method::POST,
            hub.endpoint("add_subjects_endpoint"),
            Some(json!({"stream_id": stream_id, "subjects": [subject]})),
        ),
        (
            "remove subject",
            Method::POST,
            hub.endpoint("remove_subject_endpoint"),
            Some(json!({"stream_id": stream_id, "subject": subject})),
        ),
        ("verify", Method::POST, hub.endpoint("verification_endpoint"), Some(json!({"stream_id": stream_id}))),
        ("poll", Method::POST, poll_url.to_owned(), Some(json!({"returnImmediately": true}))),
    ]
}

async fn every_management_operation_needs_a_valid_bearer_token(base: HubOptions) {
    let hub = Hub::start_with(base.clone()).await;
    let rp = hub.receiver("authn").await;
    let (stream_id, poll_url) = hub.poll_stream(&rp).await;

    for (name, method, url, body) in operations(&hub, &stream_id, &poll_url) {
        let make_body = || body.clone().map_or(Body::None, Body::Json);
        let missing = hub.send(method.clone(), &url, None, make_body()).await;
        assert_eq!(missing.status, 401, "{name} without a token: {}", missing.text);
        let challenge = missing.header("www-authenticate").unwrap_or_default().to_owned();
        assert!(challenge.starts_with("Bearer"), "{name} without a token: WWW-Authenticate {challenge:?}");
        let missing = missing.no_store();
        assert!(missing.text.is_empty() || missing.json().is_object(), "{name}: {}", missing.text);

        for wrong in ["ssf_not-a-real-token", ADMIN_TOKEN, rp.token.to_uppercase().as_str()] {
            let reply = hub.send(method.clone(), &url, Some(wrong), make_body()).await;
            assert_eq!(reply.status, 401, "{name} with token {wrong}: {}", reply.text);
            let challenge = reply.header("www-authenticate").unwrap_or_default();
            assert!(challenge.starts_with("Bearer"), "{name}: WWW-Authenticate {challenge:?}");
            assert!(challenge.contains("invalid_token"), "{name}: WWW-Authenticate {challenge:?}");
        }

        // The right token in another scheme is no bearer token.
        let mut request = hub.http.request(method.clone(), &url).header("authorization", format!("Basic {}", rp.token));
        if let Some(body) = &body {
            request = request.json(body);
        }
        let reply = request.send().await.expect("request");
        assert_eq!(reply.status(), 401, "{name} with a Basic credential");
        assert!(reply.headers().get("www-authenticate").is_some(), "{name}: no challenge");
    }

    // None of that changed anything.
    let streams = hub.get(&hub.endpoint("configuration_endpoint"), &rp.token).await.expect(200).json();
    assert_eq!(streams.as_array().map(Vec::len), Some(1), "{streams}");
    let status = hub.get(&hub.status_url(&stream_id), &rp.token).await.expect(200).json();
    assert_eq!(status["status"], "enabled");
}

async fn a_read_only_token_may_read_but_not_manage(base: HubOptions) {
    let hub = Hub::start_with(base.clone()).await;
    let reader = hub
        .receiver_with(json!({"name": "reader", "audience": "https://reader.example/", "scopes": ["ssf.read"]}))
        .await;
    // The poll URL of a stream the reader does not have, from a real one.
    let manager = hub.receiver("manager").await;
    let (stream_id, poll_url) = hub.poll_stream(&manager).await;
    let poll_url = poll_url.replace(&stream_id, UNKNOWN_STREAM);
    for (name, method, url, body) in operations(&hub, UNKNOWN_STREAM, &poll_url) {
        let reply = hub.send(method, &url, Some(&reader.token), body.map_or(Body::None, Body::Json)).await.no_store();
        match name {
            "list" => {
                assert_eq!(reply.status, 200, "list: {}", reply.text);
                assert_eq!(reply.json(), json!([]));
            }
            // Allowed, but there is no such stream.
            "read" | "status read" | "poll" => assert_eq!(reply.status, 404, "{name}: {}", reply.text),
            _ => {
                assert_eq!(reply.status, 403, "{name} with ssf.read only: {}", reply.text);
                let challenge = reply.header("www-authenticate").unwrap_or_default();
                assert!(challenge.contains("insufficient_scope"), "{name}: WWW-Authenticate {challenge:?}");
            }
        }
    }
    // The refused create created nothing.
    let listed = hub.get(&hub.endpoint("configuration_endpoint"), &reader.token).await.expect(200);
    assert_eq!(listed.json(), json!([]));
}

// ---------------------------------------------------------------- 404

async fn an_unknown_stream_is_404_everywhere(base: HubOptions) {
    let hub = Hub::start_with(base.clone()).await;
    let rp = hub.receiver("finder").await;
    let (stream_id, poll_url) = hub.poll_stream(&rp).await;
    assert!(poll_url.contains(&stream_id), "poll URL {poll_url} does not name its stream");
    let unknown_poll_url = poll_url.replace(&stream_id, UNKNOWN_STREAM);

    for (name, method, url, body) in operations(&hub, UNKNOWN_STREAM, &unknown_poll_url) {
        if name == "create" || name == "list" {
            continue;
        }
        let reply = hub.send(method, &url, Some(&rp.token), body.map_or(Body::None, Body::Json)).await;
        assert_eq!(reply.status, 404, "{name} of an unknown stream: {}", reply.text);
        reply.no_store();
    }
    // The receiver's real stream is untouched.
    let status = hub.get(&hub.status_url(&stream_id), &rp.token).await.expect(200).json();
    assert_eq!(status, json!({"stream_id": stream_id, "status": "enabled"}));
}

// ---------------------------------------------------------------- 400

async fn broken_request_bodies_are_400(base: HubOptions) {
    let hub = Hub::start_with(base.clone()).await;
    let rp = hub.receiver("clumsy").await;
    let streams = hub.endpoint("configuration_endpoint");
    let token = Some(rp.token.as_str());
    let (first, _) = hub.poll_stream(&rp).await;
    let (second, _) = hub.poll_stream(&rp).await;

    let bad_creates = [
        ("invalid JSON", Body::Raw("{\"delivery\": ")),
        ("a JSON array", Body::Raw("[1, 2]")),
        ("a JSON string", Body::Raw("\"stream\"")),
        (
            "an unsupported delivery method",
            Body::Json(
                json!({"delivery": {"method": "urn:example:carrier-pigeon", "endpoint_url": "https://rp.example/"}}),
            ),
        ),
        ("push without endpoint_url", Body::Json(json!({"delivery": {"method": PUSH}}))),
    ];
    for (what, body) in bad_creates {
        let reply = hub.send(Method::POST, &streams, token, body).await;
        assert_eq!(reply.status, 400, "create with {what}: {}", reply.text);
        reply.no_store();
    }
    let reply = hub.patch(&streams, &rp.token, json!({"description": "which stream?"})).await;
    assert_eq!(reply.status, 400, "PATCH without stream_id: {}", reply.text);
    let reply = hub.put(&streams, &rp.token, json!({"description": "which stream?"})).await;
    assert_eq!(reply.status, 400, "PUT without stream_id: {}", reply.text);
    let reply = hub.send(Method::PATCH, &streams, token, Body::Raw("not json")).await;
    assert_eq!(reply.status, 400, "PATCH with invalid JSON: {}", reply.text);

    // DELETE without stream_id never means "all streams".
    let reply = hub.delete(&streams, &rp.token).await;
    assert_eq!(reply.status, 400, "DELETE without stream_id: {}", reply.text);
    let listed = hub.get(&streams, &rp.token).await.expect(200).json();
    let ids: BTreeSet<String> = listed.as_array().expect("array").iter().map(|s| s["stream_id"].to_string()).collect();
    assert_eq!(ids, [&first, &second].map(|id| json!(id).to_string()).into_iter().collect());
    hub.get(&hub.stream_url(&first), &rp.token).await.expect(200);
    hub.get(&hub.stream_url(&second), &rp.token).await.expect(200);

    // Status, subjects, verification, poll.
    let status = hub.endpoint("status_endpoint");
    let reply = hub.post(&status, &rp.token, json!({"stream_id": first, "status": "sleeping"})).await;
    assert_eq!(reply.status, 400, "status `sleeping`: {}", reply.text);
    let reply = hub.post(&status, &rp.token, json!({"stream_id": first})).await;
    assert_eq!(reply.status, 400, "status missing: {}", reply.text);
    assert_eq!(hub.get(&hub.status_url(&first), &rp.token).await.expect(200).json()["status"], "enabled");
    for endpoint in ["add_subject_endpoint", "remove_subject_endpoint"] {
        let body = json!({"stream_id": first, "subject": {"email": "user@example.com"}});
        let reply = hub.post(&hub.endpoint(endpoint), &rp.token, body).await;
        assert_eq!(reply.status, 400, "{endpoint} with a subject without format: {}", reply.text);
        let reply = hub.send(Method::POST, &hub.endpoint(endpoint), token, Body::Raw("{")).await;
        assert_eq!(reply.status, 400, "{endpoint} with invalid JSON: {}", reply.text);
    }
    let reply = hub.send(Method::POST, &hub.endpoint("verification_endpoint"), token, Body::Raw("[]")).await;
    assert_eq!(reply.status, 400, "verification with an array: {}", reply.text);
    let reply = hub.post(&hub.endpoint("verification_endpoint"), &rp.token, json!({"state": "no stream"})).await;
    assert_eq!(reply.status, 400, "verification without stream_id: {}", reply.text);
}

async fn a_push_endpoint_on_loopback_is_400_without_an_allow_list(base: HubOptions) {
    let hub = Hub::start_with(HubOptions { push_allow_cidrs: "", ..base.clone() }).await;
    let rp = hub.receiver("ssrf").await;
    let receiver = PushReceiver::accepting().await;
    let streams = hub.endpoint("configuration_endpoint");
    let body = json!({"delivery": {"method": PUSH, "endpoint_url": receiver.url}});
    let reply = hub.post(&streams, &rp.token, body.clone()).await;
    assert_eq!(reply.status, 400, "push to loopback accepted: {}", reply.text);
    let description = reply.no_store().json()["description"].as_str().unwrap_or_default().to_owned();
    assert!(description.contains("127.0.0.1"), "the refusal does not name the address: {description}");

    // Nor can an existing stream be switched to it.
    let (stream_id, _) = hub.poll_stream(&rp).await;
    let mut patch = body;
    patch["stream_id"] = json!(stream_id);
    let reply = hub.patch(&streams, &rp.token, patch).await;
    assert_eq!(reply.status, 400, "PATCH to a loopback push endpoint accepted: {}", reply.text);
    assert_eq!(hub.get(&hub.stream_url(&stream_id), &rp.token).await.expect(200).json()["delivery"]["method"], POLL);
    assert_eq!(hub.get(&streams, &rp.token).await.expect(200).json().as_array().map(Vec::len), Some(1));
    assert!(receiver.requests().is_empty());
}

// ---------------------------------------------------------------- status

async fn status_reads_enabled_then_paused_with_its_reason(base: HubOptions) {
    let hub = Hub::start_with(base.clone()).await;
    let rp = hub.receiver("status").await;
    let (stream_id, poll_url) = hub.poll_stream(&rp).await;
    let status = hub.get(&hub.status_url(&stream_id), &rp.token).await.expect(200).no_store().json();
    assert_eq!(status, json!({"stream_id": stream_id, "status": "enabled"}));

    let body = json!({"stream_id": stream_id, "status": "paused", "reason": "receiver maintenance"});
    let updated = hub.post(&hub.endpoint("status_endpoint"), &rp.token, body.clone()).await.expect(200).no_store();
    assert_eq!(updated.json(), body);
    assert_eq!(hub.get(&hub.status_url(&stream_id), &rp.token).await.expect(200).json(), body);

    // Paused: a verification is held, not polled.
    hub.verify(&rp, &stream_id, "held").await;
    let held = hub.poll(&rp, &poll_url, json!({"returnImmediately": true})).await;
    assert_eq!(held, json!({"sets": {}, "moreAvailable": false}), "a paused stream handed out a SET");

    hub.set_status(&rp, &stream_id, "enabled").await;
    let status = hub.get(&hub.status_url(&stream_id), &rp.token).await.expect(200).json();
    assert_eq!(status, json!({"stream_id": stream_id, "status": "enabled"}));
    let released = hub.poll(&rp, &poll_url, json!({"returnImmediately": true})).await;
    let sets = polled(&released);
    assert_eq!(sets.len(), 1, "{released}");
    assert_verification(&hub.verify_set(&sets[0].1, &rp), &stream_id, "held");
}

// ---------------------------------------------------------------- subjects

async fn subjects_are_added_and_removed(base: HubOptions) {
    let hub = Hub::start_with(base.clone()).await;
    let rp = hub.receiver("subjects").await;
    let (stream_id, _) = hub.poll_stream(&rp).await;
    let add = hub.endpoint("add_subject_endpoint");
    let remove = hub.endpoint("remove_subject_endpoint");
    let email = json!({"format": "email", "email": "user@example.com"});
    let session = json!({"format": "complex", "session": {"format": "opaque", "id": "session-1"}});

    let reply = hub.post(&add, &rp.token, json!({"stream_id": stream_id, "subject": email, "verified": true})).await;
    reply.expect(200).no_store();
    // An agent session is kept as a touch in the hub's graph (pruned with
    // the session), not in the stream's subject list, which stays bounded.
    hub.post(&add, &rp.token, json!({"stream_id": stream_id, "subject": session})).await.expect(200).no_store();
    assert_eq!(hub.admin_stream(&stream_id).await["subjects"], 1);

    let reply = hub.post(&remove, &rp.token, json!({"stream_id": stream_id, "subject": email})).await;
    assert!(reply.expect(204).no_store().text.is_empty());
    assert_eq!(hub.admin_stream(&stream_id).await["subjects"], 0);
    hub.post(&remove, &rp.token, json!({"stream_id": stream_id, "subject": session})).await.expect(204).no_store();
    assert_eq!(hub.admin_stream(&stream_id).await["subjects"], 0);
}

// ---------------------------------------------------------------- verification

async fn verification_over_push_with_and_without_an_authorization_header(base: HubOptions) {
    let hub = Hub::start_with(HubOptions { min_verification_interval_secs: 5, ..base.clone() }).await;
    let rp = hub.receiver("verifier").await;

    let with_header = PushReceiver::accepting().await;
    let stream_id = hub.push_stream(&rp, &with_header.url, Some("Bearer rp-push-secret")).await;
    let config = hub.get(&hub.stream_url(&stream_id), &rp.token).await.expect(200).json();
    assert_eq!(config["min_verification_interval"], 5);
    hub.verify(&rp, &stream_id, "state-with-header").await;
    let pushes = with_header.wait_for(1).await;
    assert_push_request(&pushes[0], Some("Bearer rp-push-secret"));
    let set = hub.verify_set(&pushes[0].body, &rp);
    assert_verification(&set, &stream_id, "state-with-header");
    assert!((caep_schemas::set::now_secs() - set.iat).abs() <= 60, "iat {} is not now", set.iat);
    // Only this receiver's audience accepts it.
    let other = SecurityEventToken::verify(&pushes[0].body, &hub.jwks, &Expectations::new(&hub.issuer, "other"));
    assert!(matches!(other, Err(SetError::WrongAudience)), "{other:?}");

    // A second request inside min_verification_interval.
    let again = hub
        .post(&hub.endpoint("verification_endpoint"), &rp.token, json!({"stream_id": stream_id, "state": "too soon"}))
        .await;
    assert_eq!(again.status, 429, "{}", again.text);
    let retry_after: u64 = again.header("retry-after").expect("Retry-After").parse().expect("delay-seconds");
    assert!((1..=5).contains(&retry_after), "Retry-After {retry_after}");
    again.no_store();
    with_header.assert_stays_at(1, Duration::from_millis(300)).await;

    let without_header = PushReceiver::accepting().await;
    let bare_stream = hub.push_stream(&rp, &without_header.url, None).await;
    hub.verify(&rp, &bare_stream, "state-bare").await;
    let pushes = without_header.wait_for(1).await;
    assert_push_request(&pushes[0], None);
    let bare = hub.verify_set(&pushes[0].body, &rp);
    assert_verification(&bare, &bare_stream, "state-bare");
    assert_ne!(bare.jti, set.jti);
    assert_eq!(with_header.requests().len(), 1, "one stream's SET went to another's endpoint");
}

async fn verification_over_poll_with_acknowledgement_and_long_poll(base: HubOptions) {
    let hub = Arc::new(Hub::start_with(HubOptions { long_poll_secs: 2, ..base.clone() }).await);
    let rp = hub.receiver("poll-verifier").await;
    let (stream_id, poll_url) = hub.poll_stream(&rp).await;

    hub.verify(&rp, &stream_id, "poll-1").await;
    let first = hub.poll(&rp, &poll_url, json!({"returnImmediately": true})).await;
    let sets = polled(&first);
    assert_eq!(sets.len(), 1, "{first}");
    assert_eq!(first["moreAvailable"], false);
    let (jti, token) = sets[0].clone();
    let set = hub.verify_set(&token, &rp);
    assert_eq!(set.jti, jti, "the sets key is the SET's jti");
    assert_verification(&set, &stream_id, "poll-1");

    // Not acknowledged: sent again, the same SET; one at a time with moreAvailable.
    hub.verify(&rp, &stream_id, "poll-1b").await;
    let one = hub.poll(&rp, &poll_url, json!({"maxEvents": 1, "returnImmediately": true})).await;
    assert_eq!(polled(&one), [(jti.clone(), token.clone())], "oldest first");
    assert_eq!(one["moreAvailable"], true);
    let both = hub.poll(&rp, &poll_url, json!({"returnImmediately": true})).await;
    assert_eq!(polled(&both).len(), 2, "{both}");
    let second_jti = polled(&both).into_iter().map(|(jti, _)| jti).find(|other| *other != jti).expect("second");
    hub.poll(&rp, &poll_url, json!({"ack": [second_jti], "maxEvents": 0, "returnImmediately": true})).await;
    let again = hub.poll(&rp, &poll_url, json!({"returnImmediately": true})).await;
    assert_eq!(polled(&again), [(jti.clone(), token.clone())]);

    // Acknowledge only.
    let ack_only = hub.poll(&rp, &poll_url, json!({"ack": [jti], "maxEvents": 0, "returnImmediately": true})).await;
    assert_eq!(ack_only["sets"], json!({}), "an ack-only poll returned SETs");
    let after_ack = hub.poll(&rp, &poll_url, json!({"returnImmediately": true})).await;
    assert_eq!(after_ack, json!({"sets": {}, "moreAvailable": false}));

    // A long poll returns as soon as a SET is queued.
    let waiting = {
        let (hub, rp, poll_url) = (Arc::clone(&hub), rp.clone(), poll_url.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let response = hub.poll(&rp, &poll_url, json!({"maxEvents": 10})).await;
            (response, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "the long poll returned before anything was queued");
    hub.verify(&rp, &stream_id, "poll-2").await;
    let (response, elapsed) = tokio::time::timeout(WAIT, waiting).await.expect("long poll returns").expect("join");
    let sets = polled(&response);
    assert_eq!(sets.len(), 1, "{response}");
    assert_verification(&hub.verify_set(&sets[0].1, &rp), &stream_id, "poll-2");
    assert!(elapsed < Duration::from_millis(1800), "the long poll waited {elapsed:?}, not woken by the SET");
    hub.poll(&rp, &poll_url, json!({"ack": [sets[0].0], "maxEvents": 0, "returnImmediately": true})).await;

    // With nothing queued it waits out the long-poll bound, then returns empty.
    let started = Instant::now();
    let empty = hub.poll(&rp, &poll_url, json!({})).await;
    assert_eq!(empty, json!({"sets": {}, "moreAvailable": false}));
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(1900) && waited < Duration::from_secs(5), "long poll took {waited:?}");
}

// ---------------------------------------------------------------- isolation

async fn a_receiver_cannot_see_or_touch_another_receivers_stream(base: HubOptions) {
    let hub = Hub::start_with(base.clone()).await;
    let alice = hub.receiver("alice").await;
    let bob = hub.receiver("bob").await;
    let (alice_stream, alice_poll) = hub.poll_stream(&alice).await;
    let (bob_stream, bob_poll) = hub.poll_stream(&bob).await;
    let alice_config = hub.get(&hub.stream_url(&alice_stream), &alice.token).await.expect(200).json();
    // Audiences are unique: nobody else can register as alice's audience.
    let body = json!({"name": "mallory", "audience": alice.audience});
    hub.admin(Method::POST, "/admin/receivers", Body::Json(body)).await.expect(409);

    for (name, method, url, body) in operations(&hub, &alice_stream, &alice_poll) {
        if name == "create" || name == "list" {
            continue;
        }
        let reply = hub.send(method, &url, Some(&bob.token), body.map_or(Body::None, Body::Json)).await;
        assert_eq!(reply.status, 404, "bob's {name} of alice's stream: {}", reply.text);
    }
    let bobs = hub.get(&hub.endpoint("configuration_endpoint"), &bob.token).await.expect(200).json();
    let listed: Vec<&Value> = bobs.as_array().expect("array").iter().map(|s| &s["stream_id"]).collect();
    assert_eq!(listed, [&json!(bob_stream)], "bob lists only his own stream");
    assert_eq!(hub.get(&hub.stream_url(&alice_stream), &alice.token).await.expect(200).json(), alice_config);
    let status = hub.get(&hub.status_url(&alice_stream), &alice.token).await.expect(200).json();
    assert_eq!(status["status"], "enabled");
    assert_eq!(hub.admin_stream(&alice_stream).await["subjects"], 0);
    // Bob's refused verification queued nothing for alice.
    assert_eq!(hub.admin_stream(&alice_stream).await["queued"], 0);

    // Bob acknowledging (or reporting an error on) alice's SET changes nothing.
    hub.verify(&alice, &alice_stream, "alice's").await;
    let alice_sets = polled(&hub.poll(&alice, &alice_poll, json!({"returnImmediately": true})).await);
    assert_eq!(alice_sets.len(), 1);
    let (jti, token) = alice_sets[0].clone();
    let bob_poll_body = json!({
        "ack": [jti],
        "setErrs": {jti.clone(): {"err": "invalid_key", "description": "not mine"}},
        "returnImmediately": true,
    });
    let bob_sees = hub.poll(&bob, &bob_poll, bob_poll_body).await;
    assert_eq!(bob_sees["sets"], json!({}), "bob was handed alice's SET");
    let still = hub.poll(&alice, &alice_poll, json!({"returnImmediately": true})).await;
    assert_eq!(polled(&still), [(jti, token.clone())], "bob's ack removed alice's SET");
    assert_eq!(hub.dead_letters(&alice_stream).await, Vec::<Value>::new());
    // And the SET itself is addressed to alice only.
    let as_bob = SecurityEventToken::verify(&token, &hub.jwks, &Expectations::new(&hub.issuer, &bob.audience));
    assert!(matches!(as_bob, Err(SetError::WrongAudience)), "{as_bob:?}");
}

// ---------------------------------------------------------------- metrics

/// The value of the first sample of `name` whose labels include all of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|line| !line.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
        let matches = metric == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        if matches { value.parse().ok() } else { None }
    })
}

// Guards: counters incremented before the first scrape are not lost (the
// recorder is installed at start); the outbox depth shows held SETs without
// a series per stream; /metrics on the main address needs the admin token,
// on the metrics listener none.
async fn metrics_count_push_attempts_and_deliveries_and_show_outbox_depth(base: HubOptions) {
    let hub = Hub::start_with(base.clone()).await;
    let rp = hub.receiver("measured").await;
    let receiver = PushReceiver::accepting().await;
    let delivered_stream = hub.push_stream(&rp, &receiver.url, None).await;
    let held_stream = hub.push_stream(&rp, &receiver.url, None).await;
    hub.set_status(&rp, &held_stream, "paused").await;
    hub.verify(&rp, &held_stream, "held").await;
    hub.verify(&rp, &delivered_stream, "measured").await;
    receiver.wait_for(1).await;
    hub.wait_queued(&delivered_stream, 0).await;

    // The delivery's counters follow the outbox removal by a few instructions.
    tokio::time::sleep(Duration::from_millis(50)).await;

    let on_main = format!("{}/metrics", hub.issuer);
    hub.send(Method::GET, &on_main, None, Body::None).await.expect(401);
    hub.send(Method::GET, &on_main, Some("not-the-admin-token"), Body::None).await.expect(401);
    hub.admin(Method::GET, "/metrics", Body::None).await.expect(200);
    // One scrape only: a retry would see other tests' deliveries.
    let reply = hub.send(Method::GET, &hub.metrics_url, None, Body::None).await.expect(200);
    assert!(reply.header("content-type").is_some_and(|t| t.starts_with("text/plain")), "{:?}", reply.headers);
    let text = reply.text;
    let attempts = sample(&text, "caep_push_attempts_total", &[("outcome", "delivered")]);
    assert!(attempts.is_some_and(|n| n >= 1.0), "the push attempt was not counted: {attempts:?}\n{text}");
    let deliveries = sample(&text, "caep_deliveries_total", &[("method", "push"), ("outcome", "delivered")]);
    assert!(deliveries.is_some_and(|n| n >= 1.0), "the delivery was not counted: {deliveries:?}\n{text}");
    assert_eq!(sample(&text, "caep_outbox_depth", &[]), Some(1.0), "the held SET: {text}");
    assert_eq!(sample(&text, "caep_outbox_depth_max", &[]), Some(1.0), "{text}");
    assert_eq!(sample(&text, "caep_streams", &[("status", "paused")]), Some(1.0), "{text}");
    assert!(!text.contains(&delivered_stream) && !text.contains(&held_stream), "no series per stream: {text}");
}

// ---------------------------------------------------------------- both backends

/// Every conformance test above, on the embedded default and in Kafka mode
/// (librdkafka's in-process mock cluster).
macro_rules! on_every_backend {
    ($($test:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::HubOptions::default()).await
                }
            )*
        }
        mod kafka {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::HubOptions { kafka: true, ..super::HubOptions::default() }).await
                }
            )*
        }
    };
}

on_every_backend!(
    metadata_advertises_absolute_endpoints_under_the_issuer,
    push_stream_lifecycle_create_read_list_update_replace_delete,
    poll_stream_lifecycle_with_a_transmitter_supplied_endpoint,
    every_management_operation_needs_a_valid_bearer_token,
    a_read_only_token_may_read_but_not_manage,
    an_unknown_stream_is_404_everywhere,
    broken_request_bodies_are_400,
    a_push_endpoint_on_loopback_is_400_without_an_allow_list,
    status_reads_enabled_then_paused_with_its_reason,
    subjects_are_added_and_removed,
    verification_over_push_with_and_without_an_authorization_header,
    verification_over_poll_with_acknowledgement_and_long_poll,
    a_receiver_cannot_see_or_touch_another_receivers_stream,
    push_is_retried_with_the_same_jti_until_accepted,
    a_rejected_push_is_dead_lettered_and_replayed_with_the_same_jti,
    a_paused_push_stream_holds_its_sets_until_resumed,
    a_transmitter_initiated_pause_is_announced_by_a_stream_updated_set,
    receiver_changes_during_a_transmitter_initiated_pause_are_not_lost,
    deleting_a_receiver_revokes_its_token_and_deletes_its_streams,
    deleting_a_push_stream_stops_retrying_its_sets,
    disabling_a_push_stream_drops_the_set_being_retried,
    metrics_count_push_attempts_and_deliveries_and_show_outbox_depth,
);
