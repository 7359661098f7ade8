#![forbid(unsafe_code)]
//! Revocation-cascade drills (filled by the drills issue).
