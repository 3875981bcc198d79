//! `strom cluster unregister --id N`: removes a decommissioned broker from the cluster for good
//! (KIP-631 UnregisterBroker), in the manner of `kafka-cluster.sh unregister`. The broker
//! leaves every ISR, ELR and leadership and its registration goes; a broker-only node also
//! leaves the metadata quorum (no longer an observer). Stop the broker first: one still running
//! shuts itself down at its next heartbeat.

use anyhow::Result;
use clap::{Args, Subcommand};
use kafka_protocol::messages::{BrokerId, UnregisterBrokerRequest};

use crate::client::{check, Conn};

#[derive(Args, Debug)]
pub struct ClusterArgs {
    /// A broker to talk to (HOST:PORT, or a comma-separated list: the first that answers).
    #[arg(long, global = true, default_value = "127.0.0.1:9092")]
    bootstrap: String,
    #[command(subcommand)]
    cmd: ClusterCmd,
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// Remove a broker for good: out of every ISR and leadership, no longer registered, no
    /// longer in the metadata quorum. Controller voters cannot be unregistered.
    Unregister {
        /// The broker's node id.
        #[arg(long)]
        id: i32,
    },
}

pub fn run(args: ClusterArgs) -> Result<()> {
    let mut conn = Conn::connect(&args.bootstrap)?;
    match args.cmd {
        ClusterCmd::Unregister { id } => {
            let req = UnregisterBrokerRequest::default().with_broker_id(BrokerId(id));
            let resp = conn.call(&req, 0)?;
            check(
                resp.error_code,
                resp.error_message.as_deref(),
                "UnregisterBroker",
            )?;
            println!("Broker {id} is no longer registered.");
            Ok(())
        }
    }
}
