package custody

default allow := false

allow if not startswith(input.subject.current_user, "tmp_")

deny contains "DDL is for the migrator role only" if {
    startswith(input.command, "DROP")
    not "migrator" in input.subject.roles
}

deny contains "TRUNCATE is forbidden" if input.command == "TRUNCATE"

deny contains "ALTER SYSTEM is forbidden" if input.command == "ALTER SYSTEM"

deny contains "COPY TO PROGRAM is forbidden" if {
    input.command == "COPY"
    some o in input.objects
    o.kind == "program"
}

deny contains msg if {
    some o in input.objects
    o.schema == "hr"
    not "hr" in input.subject.roles
    msg := sprintf("%s.%s is for hr only", [o.schema, o.name])
}

deny contains msg if {
    some o in input.objects
    "ssn" in o.columns
    not input.subject.attributes.pii_clearance
    msg := sprintf("column ssn of %s needs pii_clearance", [o.name])
}

deny contains "writes to audit tables are forbidden" if {
    some o in input.objects
    o.schema == "audit"
    some p in o.privileges
    p in {"INSERT", "UPDATE", "DELETE", "TRUNCATE"}
}

deny contains "contractors work office hours only" if {
    "contractors" in input.subject.roles
    input.time.hour < 8
}

deny contains "contractors work office hours only" if {
    "contractors" in input.subject.roles
    input.time.hour >= 18
}

deny contains "contractors do not work weekends" if {
    "contractors" in input.subject.roles
    input.time.weekday in {"saturday", "sunday"}
}

deny contains "contract expired" if {
    "contractors" in input.subject.roles
    input.time.unix > input.subject.attributes.contract_end
}

deny contains msg if {
    some o in input.objects
    o.kind == "table"
    o.schema == "tenant_data"
    tenant := input.subject.attributes.tenant
    not startswith(o.name, sprintf("t%v_", [tenant]))
    msg := sprintf("%s belongs to another tenant", [o.name])
}

deny contains "superuser sessions must come from the admin network" if {
    "admins" in input.subject.roles
    input.client.addr != null
    not net.cidr_contains("10.0.0.0/8", input.client.addr)
}

deny contains "bulk reads by the reporting app only" if {
    count(input.objects) > 20
    input.client.application_name != "reporting"
}

deny contains "session too long" if input.session.statements > 1000000

deny contains msg if {
    input.subject.session_user != input.subject.current_user
    input.subject.current_user == "postgres"
    msg := sprintf("%s may not become postgres", [input.subject.session_user])
}

deny contains "GRANT is for the security role only" if {
    input.command in {"GRANT", "REVOKE"}
    not "security" in input.subject.roles
}

deny contains "no deletes without the writer attribute" if {
    input.command == "DELETE"
    not input.subject.attributes.writer
}

deny contains "quarantined schema" if {
    some o in input.objects
    regex.match(`^quarantine_`, o.schema)
}

row_allow if {
    input.action == "read"
    input.resource.tenant == input.subject.attributes.tenant
}

row_allow if {
    input.action == "read"
    "auditors" in input.subject.roles
}
