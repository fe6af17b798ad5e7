// Reading the JSON files and lines a user may receive from someone else (config.json, the
// tokenizer files, a run's zo2_state.json, seed-log and data lines): Note [Reading JSON].
#pragma once
#include <filesystem>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace zo2 {

// Note [Reading JSON]
// nlohmann::json parses any nesting without recursion, but copying, comparing and dumping the
// tree it builds recurse once per level: a 600 KB config.json of 300,000 '[' under an unknown
// key crashed zo2 with a stack overflow (SIGSEGV) where `c.source = j` copied it (adversarial
// pass 52), and a tokenizer.json whose decoder is a "Sequence" nested 30,000 deep crashed zo2's
// own recursive parse of it. So every reader of such a file parses through parse_json_text,
// which counts the depth while parsing (a SAX handler around nlohmann's own DOM builder) and
// refuses the document at the first container past the limit, before any deeper tree exists
// (what was built is at most that deep, so destroying it is safe too): Error(format)
// "WHERE: nested deeper than N levels". Real files stay far below the limits: Hugging Face's
// config.json and tokenizer.json nest under 10 levels (a tokenizer's Sequence of Sequences
// 2 or 3), zo2's own state and seed-log records under 6, SuperGLUE/SQuAD/DROP data under 10;
// a data line gets more room (kMaxJsonDataDepth) since its free-form extra fields are none
// of zo2's business. models/safetensors.cpp's strict header parser (which also refuses
// duplicate keys) uses the same kMaxJsonDepth.
//
// The files are read through read_regular_file, which opens without blocking and refuses a
// FIFO, a directory or a device in the file's place, naming it: a config.json that is a FIFO
// (a shared model directory) hung zo2 in open(2) forever.
inline constexpr int kMaxJsonDepth = 64;
inline constexpr int kMaxJsonDataDepth = 256;

// nlohmann::json::parse(text) (strict: nothing but whitespace after the value; no comments),
// but a document nested deeper than max_depth arrays/objects throws Error(format)
// "WHERE: nested deeper than MAX_DEPTH levels". Invalid JSON throws nlohmann's parse_error (or
// out_of_range for a number beyond a double) as json::parse does, for the caller to word.
nlohmann::json parse_json_text(std::string_view text, std::string_view where, int max_depth = kMaxJsonDepth);
// The same, keeping the objects' key order.
nlohmann::ordered_json parse_ordered_json_text(std::string_view text, std::string_view where,
                                               int max_depth = kMaxJsonDepth);

// The whole of a small file. Opens it with O_NONBLOCK (a FIFO does not block the open) and
// refuses anything but a regular file: Error(io) "PATH: is a directory, not a file" / "PATH:
// is a FIFO, not a regular file" and so on. Error(io) "PATH: cannot open: REASON" + hint
// (e.g. " (is DIR a Hugging Face model directory?)") when it cannot be opened.
std::string read_regular_file(const std::filesystem::path& path, std::string_view hint = {});

}  // namespace zo2
