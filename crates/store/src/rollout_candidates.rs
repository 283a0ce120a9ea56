//! Which devices a new rollout aims at, chosen in SQL: the target (all, a hardware, a tag, or
//! a list of ids) among the devices the caller may see, read with what decides whether each
//! needs the release. Versions are compared by the caller: they order by semver, not as text.

use std::collections::HashSet;

use flotilla_proto::DeviceId;
use sqlx::Row;

use super::params::{Params, ROWS_PER_STATEMENT};
use super::{Store, StoreResult};

/// What a rollout targets.
#[derive(Debug, Clone, Copy)]
pub enum TargetSelector<'a> {
    All,
    Hardware(&'a str),
    Tag(&'a str),
    Devices(&'a [String]),
}

/// A device the target names that is not blocked and runs `hardware` (or does not say).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub device_id: DeviceId,
    pub firmware_version: Option<String>,
}

/// The candidates, and for a list of ids the first the caller cannot see.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub candidates: Vec<Candidate>,
    pub unknown: Option<String>,
}

impl Store {
    /// The devices `selector` names among those `owner` sees (`None`: all), not blocked and
    /// built for `hardware` or not saying; ordered by id. One read transaction.
    pub async fn rollout_candidates(
        &self,
        owner: Option<i64>,
        selector: TargetSelector<'_>,
        hardware: &str,
    ) -> StoreResult<Selection> {
        let mut tx = self.begin_read().await?;
        let lists: Vec<&[String]> = match selector {
            TargetSelector::Devices(ids) => ids.chunks(ROWS_PER_STATEMENT).collect(),
            _ => vec![&[]],
        };
        let mut selection = Selection::default();
        let mut found = HashSet::new();
        for ids in lists {
            let mut p = Params::for_connection(&tx);
            let mut sql = String::from(
                "SELECT d.device_id, d.fw_version, d.blocked, d.hardware FROM devices d WHERE 1 = 1",
            );
            if owner.is_some() {
                sql += &format!(" AND d.owner_id = {}", p.list(1));
            }
            match selector {
                TargetSelector::All => {}
                TargetSelector::Hardware(_) => sql += &format!(" AND d.hardware = {}", p.list(1)),
                TargetSelector::Tag(_) => {
                    sql += &format!(
                        " AND EXISTS (SELECT 1 FROM device_tags t WHERE t.device_id = d.device_id AND t.tag = {})",
                        p.list(1)
                    )
                }
                TargetSelector::Devices(_) => {
                    sql += &format!(" AND d.device_id IN ({})", p.list(ids.len()))
                }
            }
            sql += " ORDER BY d.device_id";
            let mut q = sqlx::query(&sql);
            if let Some(o) = owner {
                q = q.bind(o);
            }
            q = match selector {
                TargetSelector::All => q,
                TargetSelector::Hardware(h) | TargetSelector::Tag(h) => q.bind(h),
                TargetSelector::Devices(_) => ids.iter().fold(q, |q, id| q.bind(id)),
            };
            for r in q.fetch_all(&mut *tx).await? {
                let id: String = r.try_get("device_id")?;
                let device_id = super::parse_device_id(&id)?;
                found.insert(id);
                let device_hw: Option<String> = r.try_get("hardware")?;
                if r.try_get::<i64, _>("blocked")? != 0 || device_hw.is_some_and(|h| h != hardware)
                {
                    continue;
                }
                selection.candidates.push(Candidate {
                    device_id,
                    firmware_version: r.try_get("fw_version")?,
                });
            }
        }
        tx.commit().await?;
        if let TargetSelector::Devices(ids) = selector {
            selection.unknown = ids.iter().find(|id| !found.contains(*id)).cloned();
            selection
                .candidates
                .sort_by(|a, b| a.device_id.cmp(&b.device_id));
        }
        Ok(selection)
    }
}
