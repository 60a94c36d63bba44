//! The /nodes search filter, in the spirit of GridProxy. Lists travel comma-separated in the query
//! string (`farm_ids=1,2,3`), as GridProxy's do.

use crate::records::NodeStatus;
use crate::{FarmId, NodeId, TwinId};
use serde::{Deserialize, Serialize};

pub const DEFAULT_PAGE_SIZE: u32 = 50;
pub const MAX_PAGE_SIZE: u32 = 1000;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeFilter {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_cru: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_mru: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_sru: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_hru: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_cru: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_mru: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_sru: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_hru: Option<u64>,
    /// Minimum free public IPv4 addresses in the node's farm.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_ips: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<NodeStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub city: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", with = "comma")]
    pub farm_ids: Option<Vec<FarmId>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub twin_id: Option<TwinId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub has_gpu: Option<bool>,
    /// `true`: only gateway nodes (those with a domain); `false`: only nodes without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none", with = "comma")]
    pub node_ids: Option<Vec<NodeId>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sort_by: Option<SortBy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sort_order: Option<SortOrder>,
    /// 1-based.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u32>,
    /// Also count every match (returned in the `count` header).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub ret_count: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SortBy {
    NodeId,
    FreeCru,
    FreeMru,
    FreeSru,
    FreeHru,
    TotalCru,
    TotalMru,
    TotalSru,
    TotalHru,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SortOrder {
    #[default]
    Asc,
    Desc,
}

impl NodeFilter {
    pub fn page(&self) -> u32 {
        self.page.unwrap_or(1).max(1)
    }

    pub fn size(&self) -> u32 {
        self.size.unwrap_or(DEFAULT_PAGE_SIZE)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.page == Some(0) {
            return Err("page starts at 1".into());
        }
        match self.size {
            Some(0) => Err("size must be at least 1".into()),
            Some(s) if s > MAX_PAGE_SIZE => Err(format!("size must be at most {MAX_PAGE_SIZE}")),
            _ => Ok(()),
        }
    }

    pub fn to_query(&self) -> String {
        serde_urlencoded::to_string(self).expect("a NodeFilter always encodes")
    }
}

/// Which contracts to list.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContractFilter {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub twin_id: Option<TwinId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<NodeId>,
    /// `live` or `deleted`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// `node` or `name`.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u32>,
}

impl ContractFilter {
    pub fn to_query(&self) -> String {
        serde_urlencoded::to_string(self).expect("a ContractFilter always encodes")
    }
}

/// `Option<Vec<T>>` as `"1,2,3"`.
mod comma {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::fmt::Display;
    use std::str::FromStr;

    pub fn serialize<S: Serializer, T: Display>(
        v: &Option<Vec<T>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(items) => {
                let joined: Vec<String> = items.iter().map(|i| i.to_string()).collect();
                s.serialize_str(&joined.join(","))
            }
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>, T>(d: D) -> Result<Option<Vec<T>>, D::Error>
    where
        T: FromStr,
        T::Err: Display,
    {
        let s = String::deserialize(d)?;
        s.split(',')
            .filter(|p| !p.trim().is_empty())
            .map(|p| {
                p.trim()
                    .parse::<T>()
                    .map_err(|e| serde::de::Error::custom(format!("{p:?}: {e}")))
            })
            .collect::<Result<Vec<T>, _>>()
            .map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_string_roundtrip() {
        let f = NodeFilter {
            free_mru: Some(1 << 30),
            status: Some(NodeStatus::Up),
            farm_ids: Some(vec![1, 2, 3]),
            sort_by: Some(SortBy::FreeMru),
            sort_order: Some(SortOrder::Desc),
            ret_count: true,
            ..Default::default()
        };
        let q = f.to_query();
        assert!(q.contains("farm_ids=1%2C2%2C3"), "{q}");
        let back: NodeFilter = serde_urlencoded::from_str(&q).unwrap();
        assert_eq!(back, f);
        assert_eq!(
            serde_urlencoded::from_str::<NodeFilter>("").unwrap(),
            NodeFilter::default()
        );
    }

    #[test]
    fn bad_queries_are_errors() {
        assert!(
            serde_urlencoded::from_str::<NodeFilter>("free_mr=5").is_err(),
            "typo is an error"
        );
        assert!(serde_urlencoded::from_str::<NodeFilter>("farm_ids=1,x").is_err());
        assert!(serde_urlencoded::from_str::<NodeFilter>("status=sideways").is_err());
        assert!(serde_urlencoded::from_str::<NodeFilter>("free_cru=-1").is_err());
        let f: NodeFilter = serde_urlencoded::from_str("size=5000").unwrap();
        assert!(f.validate().is_err());
    }
}
