//! The Kafka wire as Strom speaks it: frames with size limits, the table of API versions the
//! broker serves, request-header decoding and response encoding over `kafka-protocol` types,
//! and (in `batch`, `compression`, `records`) the zero-copy v2 record-batch view.

pub mod api;
pub mod frame;

pub use kafka_protocol;
