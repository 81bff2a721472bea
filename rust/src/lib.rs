//! flumeq's Rust core: Redis Streams I/O, the shared-memory rings between the
//! dispatcher and the actor processes, the dispatcher loop, and retry math.
//!
//! Everything here is plain Rust, testable with `cargo test`; the `PyO3`
//! bindings live in the `python` module behind the `python` feature.

pub mod backoff;
pub mod connection;
pub mod dispatcher;
pub mod envelope;
pub mod frame;
pub mod futex;
pub mod history;
pub mod keys;
pub mod outcome;
pub mod region;
pub mod ring;
pub mod scripts;
pub mod streams;
pub mod timing;

#[cfg(feature = "python")]
mod python;
