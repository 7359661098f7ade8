//! The application's side of delivery: [`EventHandler`] and [`HandlerError`].

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use crate::event::ReceivedEvent;

/// Handles verified SETs.
///
/// Returning `Ok` means "processed": push answers 202, poll acknowledges the
/// SET, and its `jti` is remembered so a copy is not handled again. Returning
/// an error means "not processed, try again later": push answers 503 (RFC
/// 8935 transmitters retry anything but 2xx and 400), poll leaves the SET
/// unacknowledged so it comes back, and the `jti` is not remembered.
///
/// Any `Fn(ReceivedEvent) -> impl Future<Output = Result<(), HandlerError>>`
/// closure is a handler, and so is an `Arc` of one (to share one handler
/// between push and poll):
///
/// ```
/// use caep_receiver::{EventHandler, HandlerError, ReceivedEvent, Signal};
///
/// fn assert_handler(_: impl EventHandler) {}
/// assert_handler(|event: ReceivedEvent| async move {
///     if let Signal::SessionRevoked { session: Some(session), .. } = event.signal() {
///         tracing::info!(session, "ending session");
///     }
///     Ok::<(), HandlerError>(())
/// });
/// ```
pub trait EventHandler: Send + Sync + 'static {
    /// Handles one verified SET.
    fn handle(&self, event: ReceivedEvent) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

impl<F, Fut> EventHandler for F
where
    F: Fn(ReceivedEvent) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    fn handle(&self, event: ReceivedEvent) -> impl Future<Output = Result<(), HandlerError>> + Send {
        self(event)
    }
}

impl<H: EventHandler> EventHandler for Arc<H> {
    fn handle(&self, event: ReceivedEvent) -> impl Future<Output = Result<(), HandlerError>> + Send {
        (**self).handle(event)
    }
}

/// A handler's failure: the SET was not processed and should come again.
///
/// Built from any error or message with `?` or [`HandlerError::new`]. It does
/// not implement `std::error::Error` itself, which is what lets every error
/// convert into it.
///
/// ```
/// use caep_receiver::HandlerError;
/// fn parse(input: &str) -> Result<u32, HandlerError> {
///     Ok(input.parse::<u32>()?)
/// }
/// assert!(parse("x").is_err());
/// assert_eq!(HandlerError::new("database down").to_string(), "database down");
/// ```
pub struct HandlerError(Box<dyn std::error::Error + Send + Sync + 'static>);

impl HandlerError {
    /// A handler error from an error or a message.
    pub fn new(error: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        HandlerError(error.into())
    }

    /// The underlying error.
    pub fn into_inner(self) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self.0
    }
}

impl<E: Into<Box<dyn std::error::Error + Send + Sync + 'static>>> From<E> for HandlerError {
    fn from(error: E) -> Self {
        HandlerError(error.into())
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}
