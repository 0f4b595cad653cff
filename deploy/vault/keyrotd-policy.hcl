# Least-privilege Vault / OpenBao policy for keyrotd.
#
# Assumes the KV v2 mount `secret` (stores.<name>.mount) and rules whose `path` starts
# with `openai/` (e.g. "openai/{project_name}/{service_account_name}"). Change both the
# mount and the prefix below if your config differs.
#
#   vault policy write keyrotd deploy/vault/keyrotd-policy.hcl
#
# keyrotd reads and writes its own secrets (check-and-set writes, DESIGN.md §3) and keeps its
# bookkeeping in KV v2 custom metadata. It never deletes, destroys or lists: not the
# secret versions (consumers may still hold an older version's key during the grace
# period), not anything outside openai/.

# Secret data: read the current record, write new versions with check-and-set
# (`options.cas`), which Vault authorises as create (first write) or update.
path "secret/data/openai/*" {
  capabilities = ["create", "read", "update"]
}

# Metadata: read the current version number (for cas) and custom_metadata; write
# custom_metadata (POST is "update", a merging PATCH is "patch"). No "delete": that
# would remove every version of a secret.
path "secret/metadata/openai/*" {
  capabilities = ["read", "update", "patch"]
}

# Renew and inspect its own token (token, AppRole and Kubernetes logins alike).
path "auth/token/renew-self" {
  capabilities = ["update"]
}

path "auth/token/lookup-self" {
  capabilities = ["read"]
}

# `keyrotd check-config --connect` asks which capabilities it has on its paths instead
# of writing and deleting a probe (also in Vault's built-in "default" policy; repeated
# here for tokens created without it).
path "sys/capabilities-self" {
  capabilities = ["update"]
}

# Not granted on purpose:
#   secret/delete/*, secret/destroy/*, secret/undelete/*  - version deletion
#   secret/metadata/* "list"                               - enumeration of other teams' paths
#   sys/* other than capabilities-self                     - anything administrative
