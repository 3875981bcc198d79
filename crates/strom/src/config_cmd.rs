//! `strom config`: describe, set and delete topic (or broker) settings, in the manner of
//! `kafka-configs.sh`. Changes go through IncrementalAlterConfigs, so they are stored by the
//! cluster and applied without a restart.

use anyhow::{bail, Context, Result};
use clap::{ArgGroup, Args, Subcommand};
use kafka_protocol::messages::describe_configs_request::DescribeConfigsResource;
use kafka_protocol::messages::incremental_alter_configs_request::{
    AlterConfigsResource, AlterableConfig,
};
use kafka_protocol::messages::{DescribeConfigsRequest, IncrementalAlterConfigsRequest};
use kafka_protocol::protocol::StrBytes;

use crate::client::{error_name, Conn};

#[derive(Args, Debug)]
pub struct ConfigArgs {
    /// A broker to talk to.
    #[arg(long, global = true, default_value = "127.0.0.1:9092")]
    bootstrap: String,
    #[command(subcommand)]
    cmd: ConfigCmd,
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("resource").required(true).args(["topic", "broker"])))]
struct Resource {
    /// A topic's settings.
    #[arg(long)]
    topic: Option<String>,
    /// A broker's settings (by node id).
    #[arg(long)]
    broker: Option<i32>,
}

#[derive(Subcommand, Debug)]
enum ConfigCmd {
    /// Every setting with its value and where it comes from.
    Describe {
        #[command(flatten)]
        resource: Resource,
    },
    /// Sets NAME=VALUE pairs.
    Set {
        #[command(flatten)]
        resource: Resource,
        #[arg(required = true, value_name = "NAME=VALUE")]
        pairs: Vec<String>,
    },
    /// Removes overrides (back to the default).
    Delete {
        #[command(flatten)]
        resource: Resource,
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
    },
}

const TOPIC: i8 = 2;
const BROKER: i8 = 4;

fn resource(r: &Resource) -> (i8, String) {
    match (&r.topic, r.broker) {
        (Some(t), _) => (TOPIC, t.clone()),
        (None, Some(b)) => (BROKER, b.to_string()),
        (None, None) => (TOPIC, String::new()),
    }
}

fn source_name(s: i8) -> &'static str {
    match s {
        1 => "dynamic topic",
        2 => "dynamic broker",
        3 => "dynamic default broker",
        4 => "static broker",
        5 => "default",
        _ => "unknown",
    }
}

pub fn run(args: ConfigArgs) -> Result<()> {
    let mut conn = Conn::connect(&args.bootstrap)?;
    match args.cmd {
        ConfigCmd::Describe { resource: r } => {
            let (kind, name) = resource(&r);
            let req = DescribeConfigsRequest::default().with_resources(vec![
                DescribeConfigsResource::default()
                    .with_resource_type(kind)
                    .with_resource_name(StrBytes::from_string(name.clone()))
                    .with_configuration_keys(None),
            ]);
            let resp = conn.call(&req, 4)?;
            let res = resp.results.first().context("empty DescribeConfigs")?;
            if res.error_code != 0 {
                bail!(
                    "{name}: {} {}",
                    error_name(res.error_code),
                    res.error_message.as_deref().unwrap_or("")
                );
            }
            println!("{:<40} {:<24} SOURCE", "NAME", "VALUE");
            for c in &res.configs {
                let value = if c.is_sensitive {
                    "(sensitive)".to_string()
                } else {
                    c.value.as_deref().unwrap_or("").to_string()
                };
                println!(
                    "{:<40} {value:<24} {}",
                    c.name.as_str(),
                    source_name(c.config_source)
                );
            }
            Ok(())
        }
        ConfigCmd::Set { resource: r, pairs } => {
            let ops = pairs
                .iter()
                .map(|p| {
                    let (k, v) = p
                        .split_once('=')
                        .with_context(|| format!("{p}: expected NAME=VALUE"))?;
                    Ok(AlterableConfig::default()
                        .with_name(StrBytes::from_string(k.to_string()))
                        .with_config_operation(0)
                        .with_value(Some(StrBytes::from_string(v.to_string()))))
                })
                .collect::<Result<Vec<_>>>()?;
            alter(&mut conn, &r, ops)
        }
        ConfigCmd::Delete { resource: r, names } => {
            let ops = names
                .iter()
                .map(|n| {
                    AlterableConfig::default()
                        .with_name(StrBytes::from_string(n.clone()))
                        .with_config_operation(1)
                        .with_value(None)
                })
                .collect();
            alter(&mut conn, &r, ops)
        }
    }
}

fn alter(conn: &mut Conn, r: &Resource, ops: Vec<AlterableConfig>) -> Result<()> {
    let (kind, name) = resource(r);
    let req = IncrementalAlterConfigsRequest::default().with_resources(vec![
        AlterConfigsResource::default()
            .with_resource_type(kind)
            .with_resource_name(StrBytes::from_string(name.clone()))
            .with_configs(ops),
    ]);
    let resp = conn.call(&req, 1)?;
    let res = resp
        .responses
        .first()
        .context("empty IncrementalAlterConfigs")?;
    if res.error_code != 0 {
        bail!(
            "{name}: {} {}",
            error_name(res.error_code),
            res.error_message.as_deref().unwrap_or("")
        );
    }
    println!("updated the configs of {name}");
    Ok(())
}
