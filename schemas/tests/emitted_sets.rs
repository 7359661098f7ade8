//! Every kind of SET this code can emit validates against the JSON Schemas,
//! and survives signing and verification unchanged.

mod support;

use caep_schemas::event::*;
use caep_schemas::jose::{Algorithm, Jwks, SigningKey};
use caep_schemas::json_schema;
use caep_schemas::set::{Expectations, SecurityEventToken};
use caep_schemas::subject::SubjectId;
use serde_json::{Map, Value, json};

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => panic!("not an object"),
    }
}

fn common() -> CaepCommon {
    CaepCommon {
        event_timestamp: Some(1_700_000_000),
        initiating_entity: Some(InitiatingEntity::Policy),
        reason_admin: Some([("en".to_owned(), "Landspeed policy violation".to_owned())].into()),
        reason_user: Some([("en".to_owned(), "Please sign in again".to_owned())].into()),
    }
}

/// One event of every modelled type, with every member this crate knows set.
fn every_event() -> Vec<Event> {
    let plain = PlainEvent::default;
    vec![
        Event::SessionRevoked(SessionRevoked { common: common(), ..Default::default() }),
        Event::TokenClaimsChange(TokenClaimsChange {
            claims: object(json!({"role": "ro-admin"})),
            common: common(),
            ..Default::default()
        }),
        Event::CredentialChange(CredentialChange {
            credential_type: "fido2-roaming".into(),
            change_type: CredentialChangeType::Revoke,
            friendly_name: Some("Jane's USB authenticator".into()),
            x509_issuer: Some("CN=Example CA".into()),
            x509_serial: Some("0a:1b".into()),
            fido2_aaguid: Some("accced6a-63f5-490a-9eea-e59bc1896cfc".into()),
            common: common(),
            ..Default::default()
        }),
        Event::AssuranceLevelChange(AssuranceLevelChange {
            namespace: "NIST-AAL".into(),
            current_level: "nist-aal2".into(),
            previous_level: Some("nist-aal1".into()),
            change_direction: Some(ChangeDirection::Increase),
            common: common(),
            ..Default::default()
        }),
        Event::DeviceComplianceChange(DeviceComplianceChange {
            previous_status: ComplianceStatus::Compliant,
            current_status: ComplianceStatus::NotCompliant,
            common: common(),
            ..Default::default()
        }),
        Event::SessionEstablished(SessionEstablished {
            fp_ua: Some("abb0b6e7da81a42233f8f2b1a8ddb1b9a4c81611".into()),
            acr: Some("AAL2".into()),
            amr: Some(vec!["otp".into()]),
            ext_id: Some("12345".into()),
            parent_session: Some(SubjectId::opaque("root-session")),
            authority: Some(Authority::Delegated),
            common: common(),
            ..Default::default()
        }),
        Event::SessionPresented(SessionPresented {
            fp_ua: Some("abb0b6e7".into()),
            ext_id: Some("12345".into()),
            audience: Some("https://rp.example.com/".into()),
            common: common(),
            ..Default::default()
        }),
        Event::RiskLevelChange(RiskLevelChange {
            principal: "USER".into(),
            current_level: RiskLevel::High,
            previous_level: Some(RiskLevel::Low),
            risk_reason: Some("PASSWORD_FOUND_IN_DATA_BREACH".into()),
            common: common(),
            ..Default::default()
        }),
        Event::AccountCredentialChangeRequired(plain()),
        Event::AccountPurged(plain()),
        Event::AccountDisabled(AccountDisabled { reason: Some("hijacking".into()), ..Default::default() }),
        Event::AccountEnabled(plain()),
        Event::IdentifierChanged(IdentifierChanged {
            new_value: Some("john.roe@example.com".into()),
            ..Default::default()
        }),
        Event::IdentifierRecycled(plain()),
        Event::CredentialCompromise(CredentialCompromise {
            credential_type: "password".into(),
            event_timestamp: Some(1_700_000_000),
            reason_admin: Some([("en".to_owned(), "found in a breach corpus".to_owned())].into()),
            reason_user: None,
            ..Default::default()
        }),
        Event::OptIn(plain()),
        Event::OptOutInitiated(plain()),
        Event::OptOutCancelled(plain()),
        Event::OptOutEffective(plain()),
        Event::RecoveryActivated(plain()),
        Event::RecoveryInformationChanged(plain()),
        Event::Verification(Verification {
            state: Some("VGhpcyBpcyBhbiBleGFtcGxlIHN0YXRlIHZhbHVlLgo=".into()),
            ..Default::default()
        }),
        Event::StreamUpdated(StreamUpdated {
            status: StreamStatus::Paused,
            reason: Some("maintenance".into()),
            ..Default::default()
        }),
    ]
}

fn subject_for(event: &Event) -> SubjectId {
    match event {
        Event::Verification(_) | Event::StreamUpdated(_) => SubjectId::opaque("stream-1"),
        Event::AccountDisabled(_) | Event::CredentialCompromise(_) => {
            SubjectId::iss_sub("https://idp.example.com/", "user-7")
        }
        _ => SubjectId::session_of(SubjectId::opaque("session-1"), Some(SubjectId::email("jane@example.com"))),
    }
}

#[test]
fn every_event_type_is_emitted_and_covered_by_a_schema() {
    let events = every_event();
    let emitted: Vec<&str> = events.iter().map(Event::type_uri).collect();
    assert_eq!(emitted, event_type::ALL, "the sample list must cover every modelled event type");
    for uri in event_type::ALL {
        assert!(json_schema::by_id(uri).is_some(), "no schema for {uri}");
    }
}

#[test]
fn every_emitted_set_validates_against_the_schemas() {
    let set_validator = support::validator_for(json_schema::SET_SCHEMA_ID);
    for event in every_event() {
        let uri = event.type_uri().to_owned();
        let set =
            SecurityEventToken::new("https://hub.example.com", "https://rp.example.com/", subject_for(&event), event)
                .with_txn("txn-1");
        let claims = Value::Object(set.to_claims());
        let errors: Vec<String> = set_validator.iter_errors(&claims).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{uri}: SET schema errors {errors:?}");
        let payload = &claims["events"][&uri];
        let event_validator = support::validator_for(&uri);
        let errors: Vec<String> = event_validator.iter_errors(payload).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{uri}: event schema errors {errors:?} for {payload}");
    }
}

#[test]
fn signed_sets_verify_unchanged_with_every_algorithm() {
    for alg in [Algorithm::Es256, Algorithm::Rs256, Algorithm::EdDsa] {
        let key = SigningKey::generate(alg).expect("key");
        let jwks = Jwks::from_keys([&key]);
        for event in every_event() {
            let set = SecurityEventToken::new(
                "https://hub.example.com",
                "https://rp.example.com/",
                subject_for(&event),
                event,
            );
            let token = set.sign(&key).expect("sign");
            let expect = Expectations::new("https://hub.example.com", "https://rp.example.com/");
            let verified = SecurityEventToken::verify(&token, &jwks, &expect).expect("verify");
            assert_eq!(verified, set, "{alg:?}");
        }
    }
}
