# Least-privilege Vault / OpenBao policy for keyrotd.
#
# Assumes the KV v2 mount `secret` (stores.<name>.mount) and rules whose `path` starts
# with `openai/` (e.g. "openai/{project_name}/{service_account_name}"). Change both the
# mount and the prefix below if your config differs.
#
#   vault policy write keyrotd deploy/vault/keyrotd-policy.hcl
#
# keyrotd writes two kinds of secret, both with check-and-set (DESIGN.md §7):
# - consumer documents at the rules' paths (openai/...): the six fields consumers read,
#   one new version per rotation;
# - its state records at _keyrotd/slots/<project_id>/<service_account_id>: intent,
#   pending key, previous key, grace clock, and where the key is served.
# It deletes a consumer document only at a former path (a renamed project or account,
# an edited rule), once that path's grace period is over; and a state record only in a
# store a rule moved away from. It never destroys versions and never lists.

# Consumer documents: read, write new versions with check-and-set (`options.cas`,
# authorised as create or update).
path "secret/data/openai/*" {
  capabilities = ["create", "read", "update"]
}

# Their metadata: the current version number (for cas), custom_metadata (the
# managed-by mark), and "delete" to remove a former path's document after its grace
# period.
path "secret/metadata/openai/*" {
  capabilities = ["read", "update", "patch", "delete"]
}

# State records, keyed by slot identity; keep them out of consumers' policies.
path "secret/data/_keyrotd/*" {
  capabilities = ["create", "read", "update"]
}

path "secret/metadata/_keyrotd/*" {
  capabilities = ["read", "update", "patch", "delete"]
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
