#![doc = include_str!("../../../README.md")]
#![warn(missing_docs, unreachable_pub)]

pub use eventbus_core::*;
