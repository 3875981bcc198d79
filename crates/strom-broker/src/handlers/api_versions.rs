//! ApiVersions: what this broker serves. Always answered with response header v0 (the client
//! parses it before it knows which header versions we use); a version newer than served is
//! answered before dispatch, in the connection (KIP-511).

use std::sync::Arc;

use kafka_protocol::messages::{ApiVersionsRequest, ApiVersionsResponse};

use super::{Ctx, HandlerError, Reply};
use crate::broker::Broker;

pub fn handle(_broker: &Arc<Broker>, ctx: &mut Ctx) -> Result<Reply, HandlerError> {
    let _req: ApiVersionsRequest = ctx.decode()?;
    let resp = ApiVersionsResponse::default()
        .with_api_keys(strom_proto::api::api_versions_list())
        .with_finalized_features_epoch(-1);
    ctx.reply(&resp)
}
