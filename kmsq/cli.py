"""The ``kmsq`` command: registers the command groups of ``kmsq.commands`` (one module each)."""

from __future__ import annotations

import click

from kmsq.commands import (
    audit,
    backup,
    bench,
    broker,
    caller,
    chaos,
    demo,
    fleet_key,
    gateway,
    hsm,
    init,
    keys,
    legacy,
    operator,
    policy,
    pool,
    provision,
    prune,
    quorum,
    root_key,
    signing_key,
    signing_rules,
    soak,
    status,
    worker,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """kmsq: a key-management service on a PKCS#11 HSM, reached through signed queue messages."""


for command in (
    # operator: set up and run an HSM host
    init.init,
    root_key.root_key,
    signing_key.signing_key,
    signing_rules.signing_rules_group,
    signing_rules.signing_log,
    hsm.hsm_group,
    backup.backup_group,
    caller.caller,
    operator.operator_group,
    quorum.propose_group,
    quorum.proposals_group,
    quorum.approve_command,
    quorum.apply_command,
    quorum.break_glass_command,
    fleet_key.fleet_key,
    pool.pool_group,
    policy.policy_group,
    audit.audit_group,
    prune.prune,
    worker.worker,
    broker.broker_group,
    status.status,
    # caller: the key-provider operations (one command per operation), in bulk, and over HTTP
    *keys.CALLER_COMMANDS,
    provision.provision,
    gateway.gateway,
    # the replaced key provider's data
    legacy.import_legacy,
    legacy.legacy_root_key,
    # measure and prove
    demo.demo,
    bench.bench,
    soak.soak,
    chaos.chaos,
):
    main.add_command(command)
