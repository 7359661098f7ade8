#![forbid(unsafe_code)]
//! Receiver SDK for relying parties (filled by the receiver-SDK issue).
