//! The operator's commands: `tail`, `publish`, `dlq`, `lag` and `topics`, and what
//! they share: reading a topic to its end ([`read`]) and showing messages
//! ([`view`]).

pub(crate) mod dlq;
pub(crate) mod lag;
pub(crate) mod publish;
pub(crate) mod read;
pub(crate) mod tail;
pub(crate) mod topics;
pub(crate) mod view;
