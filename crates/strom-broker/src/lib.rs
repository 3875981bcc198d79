//! The Strom broker: listeners and connections, one handler per Kafka API, the replica
//! manager with its partitions, fetch sessions, and the config registry.

pub mod broker;
pub mod cleaner;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod error;
pub mod fetch_session;
pub mod flusher;
pub mod groups;
pub mod handlers;
pub mod hw_checkpoint;
pub mod partition;
pub mod peer;
pub mod replica_manager;
pub mod replication;
pub mod topics;

pub use broker::{Broker, BrokerOptions, RunningBroker, StartError};
pub use config::BrokerConfig;
