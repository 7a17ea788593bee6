//! Every diagnostic of `attention!`, one file per mistake, with the expected compiler output.
//! Regenerate after a deliberate change with `TRYBUILD=overwrite cargo test -p attn-macros`,
//! then review the `.stderr` diff.

#[test]
fn diagnostics() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*/*.rs");
}
