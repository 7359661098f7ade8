//! What the application's handler receives: a verified SET with convenience
//! accessors, and [`Signal`], a small typed view of the events a relying
//! party usually acts on.

use std::time::{SystemTime, UNIX_EPOCH};

use caep_schemas::event::{self, Event, StreamStatus};
use caep_schemas::set::SecurityEventToken;
use caep_schemas::subject::SubjectId;

/// Milliseconds since the epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A SET that passed verification, as handed to an
/// [`EventHandler`](crate::EventHandler).
///
/// Events of types the SDK does not model arrive untouched, as
/// [`Event::Unknown`] in `set.event`.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceivedEvent {
    /// The verified claims.
    pub set: SecurityEventToken,
    /// The compact SET as received, for audit logs or forwarding.
    pub token: String,
    /// When it arrived, in milliseconds since the epoch.
    pub received_at_ms: i64,
}

impl ReceivedEvent {
    /// Wraps a verified SET received now.
    ///
    /// ```
    /// use caep_receiver::ReceivedEvent;
    /// use caep_schemas::event::{Event, SessionRevoked};
    /// use caep_schemas::set::SecurityEventToken;
    /// use caep_schemas::subject::SubjectId;
    ///
    /// let set = SecurityEventToken::new(
    ///     "https://hub.example.com",
    ///     "https://rp.example.com",
    ///     SubjectId::session_of(SubjectId::opaque("agent-42"), Some(SubjectId::email("ada@example.com"))),
    ///     Event::SessionRevoked(SessionRevoked::default()),
    /// )
    /// .with_txn("t-1");
    /// let event = ReceivedEvent::new(set, String::new());
    /// assert_eq!(event.session_id(), Some("agent-42"));
    /// assert_eq!(event.user(), Some(&SubjectId::email("ada@example.com")));
    /// assert_eq!(event.txn(), Some("t-1"));
    /// assert_eq!(event.event_type(), caep_schemas::event::event_type::SESSION_REVOKED);
    /// ```
    pub fn new(set: SecurityEventToken, token: String) -> Self {
        ReceivedEvent { set, token, received_at_ms: now_ms() }
    }

    /// The event-type URI.
    pub fn event_type(&self) -> &str {
        self.set.event.type_uri()
    }

    /// The event.
    pub fn event(&self) -> &Event {
        &self.set.event
    }

    /// The SET's `jti`.
    pub fn jti(&self) -> &str {
        &self.set.jti
    }

    /// The SET's `txn`: shared by every SET one cause produced (all the SETs
    /// of one revocation cascade carry the same `txn`).
    pub fn txn(&self) -> Option<&str> {
        self.set.txn.as_deref()
    }

    /// The subject, as sent.
    pub fn subject(&self) -> &SubjectId {
        &self.set.sub_id
    }

    /// The session the event is about: the id of the complex subject's
    /// `session` member (an `opaque` id, or the natural id of another simple
    /// format), or, for the session event types (`session-revoked`,
    /// `session-established`, `session-presented`), a plain `opaque` subject.
    ///
    /// Stream events (verification, stream-updated) name their stream as an
    /// opaque subject; that is not a session, so they answer `None`.
    pub fn session_id(&self) -> Option<&str> {
        match &self.set.sub_id {
            SubjectId::Complex(complex) => complex.session.as_ref().and_then(simple_id),
            SubjectId::Opaque { id } if is_session_event(&self.set.event) => Some(id),
            _ => None,
        }
    }

    /// The user the event is about: the complex subject's `user` member, or
    /// the subject itself when it names an account (email, iss_sub, account,
    /// phone number).
    pub fn user(&self) -> Option<&SubjectId> {
        match &self.set.sub_id {
            SubjectId::Complex(complex) => complex.user.as_ref(),
            subject @ (SubjectId::Email { .. }
            | SubjectId::IssSub { .. }
            | SubjectId::Account { .. }
            | SubjectId::PhoneNumber { .. }) => Some(subject),
            _ => None,
        }
    }

    /// When the event happened at its origin, in seconds since the epoch:
    /// the event's `event_timestamp` if it has one, else the SET's `iat`.
    pub fn occurred_at(&self) -> i64 {
        self.set.event.event_timestamp().unwrap_or(self.set.iat)
    }

    /// Milliseconds from [`occurred_at`](Self::occurred_at) to arrival. Both
    /// clocks are someone else's; a negative value means clock skew.
    pub fn latency_ms(&self) -> i64 {
        self.received_at_ms.saturating_sub(self.occurred_at().saturating_mul(1000))
    }

    /// A typed view of the event for the cases relying parties act on.
    ///
    /// ```
    /// # use caep_receiver::{ReceivedEvent, Signal};
    /// # use caep_schemas::event::{Event, SessionRevoked};
    /// # use caep_schemas::set::SecurityEventToken;
    /// # use caep_schemas::subject::SubjectId;
    /// # let set = SecurityEventToken::new("https://hub.example.com", "https://rp.example.com",
    /// #     SubjectId::session_of(SubjectId::opaque("agent-42"), None),
    /// #     Event::SessionRevoked(SessionRevoked::default()));
    /// # let event = ReceivedEvent::new(set, String::new());
    /// match event.signal() {
    ///     Signal::SessionRevoked { session: Some(session), .. } => assert_eq!(session, "agent-42"),
    ///     other => panic!("unexpected {other:?}"),
    /// }
    /// ```
    pub fn signal(&self) -> Signal {
        let session = self.session_id().map(str::to_owned);
        let user = self.user().cloned();
        let txn = self.set.txn.clone();
        match &self.set.event {
            Event::SessionRevoked(event) => Signal::SessionRevoked { session, user, txn, event: event.clone() },
            Event::CredentialChange(event) => Signal::CredentialChange { session, user, txn, event: event.clone() },
            Event::AccountDisabled(event) => Signal::AccountDisabled { user, txn, event: event.clone() },
            Event::Verification(event) => Signal::Verification { state: event.state.clone() },
            Event::StreamUpdated(event) => Signal::StreamUpdated { status: event.status, reason: event.reason.clone() },
            other => Signal::Other(other.clone()),
        }
    }
}

fn is_session_event(event: &Event) -> bool {
    matches!(event, Event::SessionRevoked(_) | Event::SessionEstablished(_) | Event::SessionPresented(_))
}

/// The identifying value of a simple subject identifier.
fn simple_id(subject: &SubjectId) -> Option<&str> {
    match subject {
        SubjectId::Opaque { id } => Some(id),
        SubjectId::JwtId { jti, .. } => Some(jti),
        SubjectId::SamlAssertionId { assertion_id, .. } => Some(assertion_id),
        SubjectId::Uri { uri } | SubjectId::Account { uri } => Some(uri),
        SubjectId::Did { url } => Some(url),
        _ => None,
    }
}

/// A typed view of the events a relying party usually acts on; everything
/// else is [`Signal::Other`] with the event whole (including
/// [`Event::Unknown`] for types the SDK does not model).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Signal {
    /// CAEP session-revoked: end this session (and what hangs off it).
    SessionRevoked {
        /// See [`ReceivedEvent::session_id`].
        session: Option<String>,
        /// See [`ReceivedEvent::user`].
        user: Option<SubjectId>,
        /// The cascade's `txn`.
        txn: Option<String>,
        /// The payload (initiating entity, reasons, timestamp, extensions).
        event: event::SessionRevoked,
    },
    /// CAEP credential-change.
    CredentialChange {
        /// See [`ReceivedEvent::session_id`].
        session: Option<String>,
        /// See [`ReceivedEvent::user`].
        user: Option<SubjectId>,
        /// The SET's `txn`.
        txn: Option<String>,
        /// The payload.
        event: event::CredentialChange,
    },
    /// RISC account-disabled.
    AccountDisabled {
        /// See [`ReceivedEvent::user`].
        user: Option<SubjectId>,
        /// The SET's `txn`.
        txn: Option<String>,
        /// The payload.
        event: event::AccountDisabled,
    },
    /// SSF verification: the echo of a verification request.
    Verification {
        /// The `state` the receiver sent, echoed.
        state: Option<String>,
    },
    /// SSF stream-updated: the transmitter changed the stream's status.
    StreamUpdated {
        /// The new status.
        status: StreamStatus,
        /// Why, if said.
        reason: Option<String>,
    },
    /// Any other event, whole.
    Other(Event),
}
