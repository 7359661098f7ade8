//! Forged and malformed IdP SETs are refused and change nothing (a file of
//! its own to keep `cascade.rs` short enough to read).

use super::*;

// ---------------------------------------------------------------- 5. forged and malformed IdP SETs

/// `header.payload.signature` with `header` replaced.
pub(super) fn with_header(token: &str, header: &Value) -> String {
    let mut parts = token.split('.');
    let (_, payload, signature) = (parts.next(), parts.next().expect("payload"), parts.next().expect("signature"));
    let header = URL_SAFE_NO_PAD.encode(serde_json::to_vec(header).expect("header JSON"));
    format!("{header}.{payload}.{signature}")
}

/// `token` with the signature of `other`.
pub(super) fn with_signature_of(token: &str, other: &str) -> String {
    let (signed, _) = token.rsplit_once('.').expect("compact JWS");
    let (_, signature) = other.rsplit_once('.').expect("compact JWS");
    format!("{signed}.{signature}")
}

#[track_caller]
pub(super) fn assert_refused(reply: &Reply, err: &str, what: &str) {
    assert_eq!(reply.status, 400, "{what}: {} {}", reply.status, reply.text);
    let body = reply.json();
    assert_eq!(body["err"], err, "{what}: {body}");
    assert!(body["description"].as_str().is_some_and(|d| !d.is_empty()), "{what}: no description: {body}");
}

pub(super) async fn forged_and_malformed_idp_sets_are_refused_and_change_nothing(hub: Hub) {
    let idp = Idp::register(&hub, IDP).await;
    let other_idp = Idp::register(&hub, "https://other-idp.example").await;
    let alice = email("alice@example.com");
    idp.establish(&hub, "S", &alice, None).await;
    idp.establish(&hub, "S1", &alice, Some("S")).await;
    let pusher = Relying::new(&hub, "pusher", true, &[SESSION_REVOKED], true).await;
    pusher.add_subject(&hub, "S1").await;

    let set = idp.set(session_of("S", &alice), SESSION_REVOKED, json!({})).with_txn("txn-S");
    let valid = idp.sign(&set);
    let stranger = SigningKey::generate(Algorithm::Es256).expect("key");
    let kid = idp.key.kid().to_owned();

    let mut cases: Vec<(&str, String, Option<&str>, &str)> = Vec::new();
    let secevent = Some("application/secevent+jwt");
    cases.push(("signed by an unregistered key", set.sign(&stranger).expect("sign"), secevent, "invalid_key"));
    cases.push((
        "the IdP's kid with another key's signature",
        with_signature_of(&valid, &set.sign(&stranger).expect("sign")),
        secevent,
        "invalid_key",
    ));
    let other_set = idp.set(session_of("S1", &alice), SESSION_REVOKED, json!({}));
    cases.push((
        "the IdP's signature of another SET",
        with_signature_of(&valid, &idp.sign(&other_set)),
        secevent,
        "invalid_key",
    ));
    let mut unknown_issuer = set.clone();
    unknown_issuer.iss = "https://rogue-idp.example".into();
    cases.push(("an unknown issuer", idp.sign(&unknown_issuer), secevent, "invalid_issuer"));
    let mut wrong_aud = set.clone();
    wrong_aud.aud = "https://some-other-hub.example".into();
    cases.push(("another audience", idp.sign(&wrong_aud), secevent, "invalid_audience"));
    let none_header = json!({"alg": "none", "typ": SET_TYP});
    let unsigned = with_header(&valid, &none_header);
    let (unsigned, _) = unsigned.rsplit_once('.').expect("JWS");
    cases.push(("alg none, no signature", format!("{unsigned}."), secevent, "invalid_request"));
    let none_with_kid = json!({"alg": "none", "kid": kid, "typ": SET_TYP});
    cases.push(("alg none with the IdP's kid", with_header(&valid, &none_with_kid), secevent, "invalid_request"));
    let hs256 = json!({"alg": "HS256", "kid": kid, "typ": SET_TYP});
    cases.push(("alg HS256", with_header(&valid, &hs256), secevent, "invalid_request"));
    // The classic confusion, done properly: HMAC keyed with the IdP's public
    // key, which every attacker knows. There is no HMAC code path.
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(kid.clone());
    header.typ = Some(SET_TYP.into());
    let public_key = idp.key.public_jwk().to_string();
    let hmac =
        jsonwebtoken::encode(&header, &set.to_claims(), &jsonwebtoken::EncodingKey::from_secret(public_key.as_bytes()))
            .expect("HMAC-signed");
    cases.push(("HS256 keyed with the IdP's public key", hmac, secevent, "invalid_request"));
    cases.push(("no typ", with_header(&valid, &json!({"alg": "ES256", "kid": kid})), secevent, "invalid_request"));
    cases.push((
        "typ JWT, properly signed",
        idp.key.sign("JWT", &set.to_claims()).expect("sign"),
        secevent,
        "invalid_request",
    ));
    let mut with_sub = set.to_claims();
    with_sub.insert("sub".into(), json!("alice"));
    cases.push(("a `sub` claim", idp.key.sign(SET_TYP, &with_sub).expect("sign"), secevent, "invalid_request"));
    let mut two_events = set.to_claims();
    let mut events = Map::new();
    events.insert(SESSION_REVOKED.into(), json!({}));
    events.insert(CREDENTIAL_CHANGE.into(), json!({"credential_type": "password", "change_type": "update"}));
    two_events.insert("events".into(), Value::Object(events));
    cases.push(("two events", idp.key.sign(SET_TYP, &two_events).expect("sign"), secevent, "invalid_request"));
    let mut future = set.clone();
    future.iat = now_secs() + 3600;
    cases.push(("iat an hour ahead", idp.sign(&future), secevent, "invalid_request"));
    let mut stale = set.clone();
    stale.iat = now_secs() - 3 * 24 * 3600;
    cases.push(("iat three days old", idp.sign(&stale), secevent, "invalid_request"));
    cases.push(("claiming the IdP, signed by another trusted IdP", other_idp.sign(&set), secevent, "invalid_key"));
    let mut no_iss = set.to_claims();
    no_iss.remove("iss");
    cases.push(("no iss", idp.key.sign(SET_TYP, &no_iss).expect("sign"), secevent, "invalid_request"));
    // Critical header extensions the hub does not understand, even none at
    // all, are refused before the signature is looked at (a bad signature
    // would be `invalid_key`).
    for crit in [json!([]), json!(["exp"])] {
        let header = json!({"alg": "ES256", "kid": kid, "typ": SET_TYP, "crit": crit, "exp": 1});
        cases.push(("a crit header", with_header(&valid, &header), secevent, "invalid_request"));
    }
    cases.push(("garbage", "garbage".into(), secevent, "invalid_request"));
    cases.push(("three garbage parts", "a.b.c".into(), secevent, "invalid_request"));
    cases.push(("an empty body", String::new(), secevent, "invalid_request"));
    cases.push(("Content-Type application/json", valid.clone(), Some("application/json"), "invalid_request"));
    cases.push(("Content-Type application/jwt", valid.clone(), Some("application/jwt"), "invalid_request"));
    cases.push(("Content-Type text/plain", valid.clone(), Some("text/plain"), "invalid_request"));
    cases.push(("no Content-Type", valid.clone(), None, "invalid_request"));

    for (what, body, content_type, err) in &cases {
        let reply = ingest_as(&hub, body, *content_type).await;
        assert_refused(&reply, err, what);
    }

    // Nothing changed: S and S1 stand, nobody was told anything.
    assert_not_revoked(&hub, "S").await;
    assert_not_revoked(&hub, "S1").await;
    pusher.settle(&hub, 0).await;
    hub.admin(Method::GET, "/admin/cascades/txn-S", Body::None).await.expect(404);

    // The genuine SET, refused above only for its Content-Type, still works:
    // the refusals recorded nothing (not even its jti).
    ingest(&hub, &valid).await.expect(202);
    let sets = pusher.settle(&hub, 2).await;
    for set in &sets {
        assert_revoked_set(set, &session_id(set), Some(&alice), "txn-S");
    }
    assert_revoked_by(&hub, "S1", "txn-S").await;
}
