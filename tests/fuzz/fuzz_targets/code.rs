//! Pairing codes as a person types them: parsing never panics, and a parsed
//! code shown again parses to the same code.
#![no_main]

use khub::pairing::Code;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(code) = Code::parse(text) {
        let shown = code.display();
        let again = Code::parse(&shown).expect("a shown code parses");
        assert_eq!(*again.display(), *shown);
        assert_eq!(again.nameplate(), code.nameplate());
    }
});
