//! Builds the TypeScript SDK (`clients/typescript/src`) for the chat demo's
//! page: each module's types are stripped (oxc) into `$OUT_DIR/sdk/*.js`,
//! and `$OUT_DIR/sdk.rs` lists them for `include_str!`, so `cargo run`
//! serves the SDK without Node or npm.

use oxc_allocator::Allocator;
use oxc_codegen::Codegen;
use oxc_parser::Parser;
use oxc_semantic::SemanticBuilder;
use oxc_span::SourceType;
use oxc_transformer::{TransformOptions, Transformer};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn main() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/typescript/src");
    println!("cargo:rerun-if-changed={}", src.display());
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("sdk");
    std::fs::create_dir_all(&out).expect("OUT_DIR is writable");
    let mut modules: Vec<PathBuf> = std::fs::read_dir(&src)
        .unwrap_or_else(|e| panic!("{}: {e}", src.display()))
        .map(|e| e.expect("readable directory").path())
        .filter(|p| p.extension().is_some_and(|x| x == "ts"))
        .collect();
    modules.sort();
    let mut list = String::from("/// The SDK's modules: file name and JavaScript.\n");
    list.push_str("pub const SDK: &[(&str, &str)] = &[\n");
    for path in &modules {
        println!("cargo:rerun-if-changed={}", path.display());
        let js = strip_types(path);
        let name = format!("{}.js", path.file_stem().expect("a file").to_string_lossy());
        let file = out.join(&name);
        std::fs::write(&file, js).expect("OUT_DIR is writable");
        writeln!(list, "    ({name:?}, include_str!({:?})),", file.display()).expect("a String");
    }
    list.push_str("];\n");
    std::fs::write(out.join("../sdk.rs"), list).expect("OUT_DIR is writable");
}

/// The module at `path` as JavaScript: TypeScript's types removed.
fn strip_types(path: &Path) -> String {
    let source =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let allocator = Allocator::default();
    let parsed = Parser::new(&allocator, &source, SourceType::ts()).parse();
    assert!(
        parsed.diagnostics.is_empty(),
        "{}: {:?}",
        path.display(),
        parsed.diagnostics
    );
    let mut program = parsed.program;
    let scoping = SemanticBuilder::new()
        .build(&program)
        .semantic
        .into_scoping();
    let done = Transformer::new(&allocator, path, &TransformOptions::default())
        .build_with_scoping(scoping, &mut program);
    assert!(
        done.diagnostics.is_empty(),
        "{}: {:?}",
        path.display(),
        done.diagnostics
    );
    Codegen::new().build(&program).code
}
