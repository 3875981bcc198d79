//! The Kafka error codes the coordinator answers with. Handlers put `code()` on the wire.

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    #[error("COORDINATOR_NOT_AVAILABLE")]
    CoordinatorNotAvailable,
    #[error("COORDINATOR_LOAD_IN_PROGRESS")]
    CoordinatorLoadInProgress,
    #[error("NOT_COORDINATOR")]
    NotCoordinator,
    #[error("ILLEGAL_GENERATION")]
    IllegalGeneration,
    #[error("INCONSISTENT_GROUP_PROTOCOL")]
    InconsistentGroupProtocol,
    #[error("INVALID_GROUP_ID")]
    InvalidGroupId,
    #[error("UNKNOWN_MEMBER_ID")]
    UnknownMemberId,
    #[error("INVALID_SESSION_TIMEOUT")]
    InvalidSessionTimeout,
    #[error("REBALANCE_IN_PROGRESS")]
    RebalanceInProgress,
    #[error("MEMBER_ID_REQUIRED")]
    MemberIdRequired,
    #[error("FENCED_INSTANCE_ID")]
    FencedInstanceId,
    #[error("GROUP_MAX_SIZE_REACHED")]
    GroupMaxSizeReached,
    #[error("GROUP_ID_NOT_FOUND")]
    GroupIdNotFound,
    #[error("NON_EMPTY_GROUP")]
    NonEmptyGroup,
    #[error("GROUP_SUBSCRIBED_TO_TOPIC")]
    GroupSubscribedToTopic,
    #[error("OFFSET_METADATA_TOO_LARGE")]
    OffsetMetadataTooLarge,
    #[error("UNKNOWN_TOPIC_OR_PARTITION")]
    UnknownTopicOrPartition,
    #[error("KAFKA_STORAGE_ERROR")]
    StorageError,
    #[error("INVALID_COMMIT_OFFSET_SIZE")]
    InvalidCommitOffsetSize,
    #[error("INVALID_REQUEST")]
    InvalidRequest,
    #[error("FENCED_MEMBER_EPOCH")]
    FencedMemberEpoch,
    #[error("STALE_MEMBER_EPOCH")]
    StaleMemberEpoch,
    #[error("UNSUPPORTED_ASSIGNOR")]
    UnsupportedAssignor,
    #[error("UNRELEASED_INSTANCE_ID")]
    UnreleasedInstanceId,
}

impl GroupError {
    /// The Kafka wire error code.
    pub fn code(self) -> i16 {
        match self {
            GroupError::CoordinatorNotAvailable => 15,
            GroupError::CoordinatorLoadInProgress => 14,
            GroupError::NotCoordinator => 16,
            GroupError::IllegalGeneration => 22,
            GroupError::InconsistentGroupProtocol => 23,
            GroupError::InvalidGroupId => 24,
            GroupError::UnknownMemberId => 25,
            GroupError::InvalidSessionTimeout => 26,
            GroupError::RebalanceInProgress => 27,
            GroupError::MemberIdRequired => 79,
            GroupError::FencedInstanceId => 82,
            GroupError::GroupMaxSizeReached => 81,
            GroupError::GroupIdNotFound => 69,
            GroupError::NonEmptyGroup => 68,
            GroupError::GroupSubscribedToTopic => 86,
            GroupError::OffsetMetadataTooLarge => 12,
            GroupError::UnknownTopicOrPartition => 3,
            GroupError::StorageError => 56,
            GroupError::InvalidCommitOffsetSize => 28,
            GroupError::InvalidRequest => 42,
            GroupError::FencedMemberEpoch => 110,
            GroupError::StaleMemberEpoch => 113,
            GroupError::UnsupportedAssignor => 112,
            GroupError::UnreleasedInstanceId => 111,
        }
    }
}
