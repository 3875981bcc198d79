//! The group coordinator. `group` is the classic protocol's state machine for one group (no
//! sockets, no clock of its own: every call takes `now_ms`), `consumer` the KIP-848 consumer
//! protocol's (server-side assignment, reconciliation), `records` the binary format of
//! `__consumer_offsets` (Kafka's own, so tools that read that topic keep working), and
//! `coordinator` holds the groups of every `__consumer_offsets` partition this node leads, loads
//! them from the log and writes changes to it.

pub mod consumer;
pub mod coordinator;
pub mod error;
pub mod group;
pub mod records;

pub use coordinator::{GroupConfig, GroupCoordinator, OffsetsLog};
pub use error::GroupError;

#[cfg(test)]
mod tests;
