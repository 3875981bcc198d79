//! The one place where subsystem errors become Kafka error codes.

use kafka_protocol::error::ResponseError;
use strom_log::LogError;
use strom_meta::ControllerError;

use crate::config::ConfigError;

pub fn log_error_code(e: &LogError) -> ResponseError {
    match e {
        LogError::Batch(_) | LogError::Corrupt(_) => ResponseError::CorruptMessage,
        LogError::MessageTooLarge { .. } => ResponseError::MessageTooLarge,
        LogError::OffsetOutOfRange { .. } => ResponseError::OffsetOutOfRange,
        LogError::OutOfOrderSequence { .. } => ResponseError::OutOfOrderSequenceNumber,
        LogError::InvalidProducerEpoch { .. } => ResponseError::InvalidProducerEpoch,
        LogError::InvalidTimestamp { .. } => ResponseError::InvalidTimestamp,
        LogError::Io(_) | LogError::SyncFailed(_) | LogError::Failed => {
            ResponseError::KafkaStorageError
        }
        LogError::NotLeader => ResponseError::NotLeaderOrFollower,
    }
}

pub fn controller_error_code(e: &ControllerError) -> ResponseError {
    match e {
        ControllerError::TopicAlreadyExists(_) => ResponseError::TopicAlreadyExists,
        ControllerError::InvalidTopic(_) => ResponseError::InvalidTopicException,
        ControllerError::InvalidPartitions(_) => ResponseError::InvalidPartitions,
        ControllerError::InvalidReplicationFactor(_) => ResponseError::InvalidReplicationFactor,
        ControllerError::UnknownTopic(_) | ControllerError::UnknownPartition(..) => {
            ResponseError::UnknownTopicOrPartition
        }
        ControllerError::InvalidReplicaAssignment(_) => ResponseError::InvalidReplicaAssignment,
        ControllerError::NoReassignmentInProgress(..) => ResponseError::NoReassignmentInProgress,
        ControllerError::BrokerIdNotRegistered(_) => ResponseError::BrokerIdNotRegistered,
        ControllerError::InvalidRequest(_) => ResponseError::InvalidRequest,
    }
}

pub fn config_error_code(_e: &ConfigError) -> ResponseError {
    ResponseError::InvalidConfig
}

/// Errors of the admin path: a controller refusal, or the metadata log failing.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Controller(#[from] ControllerError),
    #[error("{0}")]
    Internal(String),
}

impl From<String> for AdminError {
    fn from(s: String) -> Self {
        AdminError::Internal(s)
    }
}

impl AdminError {
    pub fn code(&self) -> ResponseError {
        match self {
            AdminError::Controller(c) => controller_error_code(c),
            AdminError::Internal(_) => ResponseError::UnknownServerError,
        }
    }
}
