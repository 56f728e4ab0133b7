//! Every table of ours goes through these three calls to nftables: list it
//! (nothing when it is absent), apply a transaction to it, and delete it.
//! Each runs `nft -j` as a child the runtime awaits (it never blocks the
//! runtime), and each failure says which table, what was being done, and
//! nft's own words.

use std::borrow::Cow;

use nftables::helper::{NftablesError, DEFAULT_NFT};
use nftables::schema::{NfCmd, NfListObject, NfObject, Nftables, Table};
use nftables::types::NfFamily;
use serde_json::Value;

/// One of our tables: its family and name (`ip overlay`, `inet overlay_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableId {
    /// The nftables family.
    pub family: NfFamily,
    /// The table's name.
    pub name: &'static str,
}

impl TableId {
    /// The family as nft's syntax names it.
    pub fn family_name(&self) -> &'static str {
        match self.family {
            NfFamily::IP => "ip",
            NfFamily::IP6 => "ip6",
            NfFamily::INet => "inet",
            NfFamily::ARP => "arp",
            NfFamily::Bridge => "bridge",
            NfFamily::NetDev => "netdev",
        }
    }

    /// The table as a schema object, for commands.
    pub fn table(&self) -> Table<'static> {
        Table { family: self.family, name: Cow::Borrowed(self.name), ..Table::default() }
    }
}

impl std::fmt::Display for TableId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.family_name(), self.name)
    }
}

/// Why nft failed, for one of our tables.
#[derive(Debug, thiserror::Error)]
#[error("nftables table {table}: {what}: {detail}")]
pub struct NftError {
    /// The table.
    pub table: TableId,
    /// What was being done.
    pub what: &'static str,
    /// nft's words.
    pub detail: String,
    /// The nft binary could not be run at all.
    pub nft_missing: bool,
}

fn error(table: TableId, what: &'static str) -> impl FnOnce(NftablesError) -> NftError {
    move |e| {
        let nft_missing = matches!(e, NftablesError::NftExecution { .. });
        let detail = match e {
            NftablesError::NftExecution { inner, .. } => {
                format!("cannot run nft (is the nftables package installed?): {inner}")
            }
            NftablesError::NftFailed { stderr, .. } => stderr.trim().to_string(),
            other => other.to_string(),
        };
        NftError { table, what, detail, nft_missing }
    }
}

/// The table as `nft -j list table` shows it (`terse`: without set
/// elements); none when there is no such table.
pub async fn list(table: TableId, terse: bool) -> Result<Option<Value>, NftError> {
    let family = table.family_name();
    let args: &[&str] =
        if terse { &["-t", "list", "table", family, table.name] } else { &["list", "table", family, table.name] };
    match nftables::helper::get_current_ruleset_raw_async(DEFAULT_NFT, args).await {
        Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| NftError {
            table,
            what: "reading the table",
            detail: e.to_string(),
            nft_missing: false,
        }),
        Err(NftablesError::NftFailed { stderr, .. }) if stderr.contains("No such file or directory") => Ok(None),
        Err(e) => Err(error(table, "reading the table")(e)),
    }
}

/// Applies `commands` in one transaction; `what` says what they do, for an error.
pub async fn apply(table: TableId, what: &'static str, commands: &Nftables<'_>) -> Result<(), NftError> {
    nftables::helper::apply_ruleset_async(commands).await.map_err(error(table, what))
}

/// Deletes the table, if present (adding it first makes the delete always valid).
pub async fn delete(table: TableId) -> Result<(), NftError> {
    apply(table, "removing it", &Nftables { objects: Cow::Owned(delete_commands(table)) }).await
}

/// The commands that delete the table whether or not it exists.
pub fn delete_commands(table: TableId) -> Vec<NfObject<'static>> {
    vec![
        NfObject::CmdObject(NfCmd::Add(NfListObject::Table(table.table()))),
        NfObject::CmdObject(NfCmd::Delete(NfListObject::Table(table.table()))),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_named_as_nft_names_them() {
        let t = TableId { family: NfFamily::INet, name: "overlay_policy" };
        assert_eq!(t.to_string(), "inet overlay_policy");
        let e = error(t, "reading the table")(NftablesError::NftFailed {
            program: "nft".into(),
            hint: "x".into(),
            stdout: String::new(),
            stderr: "Error: Could not process rule\n".into(),
        });
        assert_eq!(
            e.to_string(),
            "nftables table inet overlay_policy: reading the table: Error: Could not process rule"
        );
        assert!(!e.nft_missing);
        assert_eq!(delete_commands(t).len(), 2);
    }
}
