//! The Kafka wire as Strom speaks it: frames with size limits, the table of API versions the
//! broker serves, request-header decoding and response encoding over `kafka-protocol` types,
//! and the zero-copy v2 record-batch view with its compression codecs.

pub mod api;
pub mod batch;
pub mod compression;
pub mod frame;
pub mod records;
pub mod splice;

pub use kafka_protocol;
