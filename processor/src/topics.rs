//! `hooklog-processor create-topics`: creates every topic the config implies
//! through the Kafka admin API and waits until metadata lists them. For the
//! local stack, tests and clusters where operators let Hooklog do it.
//!
//! Raw topics get `retention.ms=-1` (they are the source of truth for
//! rebuilds); state topics `cleanup.policy=compact`; the DLQs keep records
//! for 30 days.

use std::time::{Duration, Instant};

use hooklog_schemas::topics;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::Config;

/// A topic and its configs.
pub struct TopicSpec {
    /// Name.
    pub name: String,
    /// Topic configs.
    pub configs: Vec<(&'static str, &'static str)>,
}

/// Every topic of the config.
pub fn all(config: &Config) -> Vec<TopicSpec> {
    let mut out: Vec<TopicSpec> = config
        .raw_topics()
        .into_iter()
        .map(|name| TopicSpec {
            name,
            configs: vec![("retention.ms", "-1")],
        })
        .collect();
    out.extend(config.projections.iter().map(|p| TopicSpec {
        name: topics::state_topic(&p.name),
        configs: vec![("cleanup.policy", "compact")],
    }));
    for dlq in [topics::DLQ, topics::DELIVERY_DLQ] {
        out.push(TopicSpec {
            name: dlq.into(),
            configs: vec![("retention.ms", "2592000000")],
        });
    }
    out
}

/// Creates the topics (existing ones are fine) and waits for metadata.
pub async fn create(
    config: &Config,
    partitions: i32,
    timeout: Duration,
) -> anyhow::Result<Vec<String>> {
    let admin: AdminClient<DefaultClientContext> =
        config.kafka.finish(config.kafka.base()).create()?;
    let specs = all(config);
    let new: Vec<NewTopic<'_>> = specs
        .iter()
        .map(|t| {
            let mut n = NewTopic::new(&t.name, partitions, TopicReplication::Fixed(1));
            for (k, v) in &t.configs {
                n = n.set(k, v);
            }
            n
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(timeout));
    for result in admin.create_topics(new.iter(), &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => anyhow::bail!("creating topic {name}: {code}"),
        }
    }
    let names: Vec<String> = specs.into_iter().map(|t| t.name).collect();
    let deadline = Instant::now() + timeout;
    loop {
        let md = admin.inner().fetch_metadata(None, Duration::from_secs(5))?;
        let missing: Vec<&String> = names
            .iter()
            .filter(|n| {
                !md.topics()
                    .iter()
                    .any(|t| t.name() == n.as_str() && !t.partitions().is_empty())
            })
            .collect();
        if missing.is_empty() {
            return Ok(names);
        }
        if Instant::now() > deadline {
            anyhow::bail!("topics not visible in metadata after {timeout:?}: {missing:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
