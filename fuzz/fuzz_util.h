// What the fuzz targets share: a scratch directory of this process for the files the
// readers under test open, splitting one input into several files, and a silent log.
//
// A target returns normally when a reader accepts its input or refuses it with zo2::Error
// (the documented way to reject a bad file). Anything else is a finding: a sanitizer
// report, a signal, or any other exception escaping (std::terminate → abort), since every
// problem with a file must be a zo2::Error naming the file.
#pragma once
#include <cstddef>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

namespace zo2::fuzz {

// A directory of its own for this process (created on first use, removed at exit).
const std::filesystem::path& scratch_dir();

// Writes `bytes` to `path` (truncating); aborts if that fails, as no input can explain it.
void write_file(const std::filesystem::path& path, std::string_view bytes);

// Writes `bytes` to scratch_dir() / name and returns the path.
std::filesystem::path scratch_file(const std::string& name, std::string_view bytes);

// The input cut at its first `count - 1` NUL bytes into `count` parts (missing parts empty):
// how the targets reading several files take them from one input.
std::vector<std::string_view> split_input(const std::uint8_t* data, std::size_t size, std::size_t count);

// Called with the error a reader refused an input with: prints it when ZO2_FUZZ_VERBOSE is
// set (to see why the seeds or a crash input's neighbours are refused), else nothing.
void rejected(const std::exception& e);

// Discards the log (messages are still formatted, so their formatting is fuzzed too).
void silence_log();

// The repository's fuzz/ directory (for fixed helper files such as the trimmed vocabulary).
std::filesystem::path source_dir();

}  // namespace zo2::fuzz
