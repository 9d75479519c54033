package custody

# A 20-rule policy of the kind a compliance team writes: roles, commands, objects, columns,
# time, client and attributes. Every statement of the benchmark is evaluated against all of it.

deny contains "suspended application" if { input.client.application_name == "blocked-app" }
deny contains "no DDL from the application role" if { input.subject.current_user == "app"; startswith(input.command, "CREATE") }
deny contains "no DROP from the application role" if { input.subject.current_user == "app"; startswith(input.command, "DROP") }
deny contains "no TRUNCATE by applications" if { input.command == "TRUNCATE TABLE"; input.subject.current_user == "app" }
deny contains "payroll is for finance" if { some o in input.objects; o.name == "payroll"; not "finance" in input.subject.roles }
deny contains "secrets table is sealed" if { some o in input.objects; o.schema == "vault" }
deny contains "ssn column is masked" if { some o in input.objects; "ssn" in o.columns; not "pii_reader" in input.subject.roles }
deny contains "card numbers are masked" if { some o in input.objects; "card_number" in o.columns; not "pci" in input.subject.roles }
deny contains "no writes to audit archives" if { some o in input.objects; startswith(o.name, "archive_"); "INSERT" in o.privileges }
deny contains "no deletes on ledgers" if { some o in input.objects; o.name == "ledger"; "DELETE" in o.privileges }
deny contains "contractors only in office hours" if { input.subject.attributes.contractor == true; input.time.hour < 8 }
deny contains "contractors only in office hours" if { input.subject.attributes.contractor == true; input.time.hour >= 18 }
deny contains "contractors not on weekends" if { input.subject.attributes.contractor == true; input.time.weekday in {"saturday", "sunday"} }
deny contains "expired engagement" if { input.subject.attributes.engagement_ended == true }
deny contains "interns read only" if { "interns" in input.subject.roles; input.command != "SELECT" }
deny contains "no GRANT by applications" if { input.command == "GRANT"; input.subject.current_user == "app" }
deny contains "no COPY out of customers" if { input.command == "COPY"; some o in input.objects; o.name == "customers" }
deny contains "remote superuser" if { input.subject.current_user == "root_remote" }
deny contains "the reporting app only reads" if { input.client.application_name == "reporting"; input.command != "SELECT" }
deny contains "untrusted network" if { input.client.addr != null; startswith(input.client.addr, "203.0.113.") }
