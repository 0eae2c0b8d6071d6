//! The consume side: subscriptions and their fetch loops
//! ([`subscription`]), what happens to one message ([`process`]: attempts,
//! retries, dead letters, settlement), and the ordered executor that runs
//! messages one at a time per aggregate ([`executor`]; generic, it imports
//! nothing from the other two).

pub(crate) mod executor;
pub(crate) mod process;
pub(crate) mod subscription;
