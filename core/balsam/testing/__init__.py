"""balsam.testing: conformance kits for plugins (see balsam.testing.transfer_contract)."""
