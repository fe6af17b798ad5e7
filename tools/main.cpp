// zo2-tune: zeroth-order fine-tuning of OPT, LLaMA, Qwen, Mistral and Gemma 3 models on one small GPU (or the
// CPU). Subcommands: init, forward, plan, train, eval, replay, synth-data, tokenize, data.
#include "api/options.h"
#include "runtime/comm.h"
#include "runtime/error.h"
#include "runtime/log.h"
#include "tools/cli.h"

#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <functional>
#include <cstdint>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

namespace {

// "--batch-size 3000000000" from CLI11's "Could not convert: --batch-size = 3000000000".
std::string conversion_subject(std::string_view what) {
  constexpr std::string_view kPrefix = "Could not convert: ";
  if (!what.starts_with(kPrefix)) return std::string(what);
  std::string rest(what.substr(kPrefix.size()));
  if (const auto eq = rest.find(" = "); eq != std::string::npos) rest.replace(eq, 3, " ");
  return rest;
}

// The range a whole number given to `flag` must lie in, for a value CLI11 could not convert
// (Note [Decimal integers] has already refused values beyond 64 bits, so the value fits 64
// bits and the flag's field is narrower: a 32-bit int). The flag's documented range where
// api/options.cpp has one ("must be an integer in [1, 64]" for --window), else the range of
// the 32-bit field; "" if the flag is not found.
std::string whole_number_range(const CLI::App& app, const std::string& flag, std::string_view value) {
  const CLI::Option* opt = nullptr;
  std::vector<const CLI::App*> apps{&app};
  for (const CLI::App* sub : app.get_subcommands()) apps.push_back(sub);  // the parsed ones first
  for (const CLI::App* sub : app.get_subcommands([](const CLI::App*) { return true; })) apps.push_back(sub);
  for (const CLI::App* a : apps)
    if (!opt) opt = a->get_option_no_throw(flag);
  if (!opt) return "";
  while (!value.empty() && value.front() == '+') value.remove_prefix(1);
  std::int64_t v = 0;
  if (std::from_chars(value.data(), value.data() + value.size(), v).ec == std::errc())
    if (std::string rule = zo2::cli::documented_integer_rule(*opt, v); !rule.empty()) return rule;
  const std::string type = opt->get_type_name();
  return type.starts_with("UINT") ? "a 32-bit field: an integer in [0, 4294967295]"
                                  : "a 32-bit field: an integer in [-2147483648, 2147483647]";
}

// "--steps was given 2 times (5, 7); give it once" for the first single-value option that
// was given more than once, in the app or the subcommand that was parsed; "" if none was.
std::string repeated_flag(const CLI::App& app) {
  std::vector<const CLI::App*> apps{&app};
  for (const CLI::App* sub : app.get_subcommands()) apps.push_back(sub);
  for (const CLI::App* a : apps)
    for (const CLI::Option* opt : a->get_options())
      if (opt->get_items_expected_max() == 1 && opt->count() > 1)
        return fmt::format("{} was given {} times ({}); give it once", opt->get_name(), opt->count(),
                           fmt::join(opt->results(), ", "));
  return "";
}

// "--shuffle and --no-shuffle were both given (…)" for a flag given with its negation in the
// app or the parsed subcommand; "" if none was (adversarial pass 71: the last one won).
std::string contradicting_flag(const CLI::App& app) {
  std::vector<const CLI::App*> apps{&app};
  for (const CLI::App* sub : app.get_subcommands()) apps.push_back(sub);
  for (const CLI::App* a : apps)
    for (const CLI::Option* opt : a->get_options()) {
      if (opt->get_expected_min() != 0 || opt->count() < 2 || opt->get_lnames().size() < 2) continue;
      const std::vector<std::string>& r = opt->results();
      if (std::adjacent_find(r.begin(), r.end(), std::not_equal_to<>()) != r.end())
        return fmt::format("--{} were both given (the last one would win): give one",
                           fmt::join(opt->get_lnames(), " and --"));
    }
  return "";
}

int run_main(int argc, char** argv) {
  CLI::App app{"zo2-tune: zeroth-order (MeZO) fine-tuning of OPT, LLaMA, Qwen2/3, Mistral and Gemma 3 models with "
               "blocks streamed through a capped GPU window"};
  app.require_subcommand(1);
  app.fallthrough();  // -v and -q also after the subcommand
  app.set_version_flag("--version", "zo2-tune 0.2.0");
  bool verbose = false, quiet = false;
  app.add_flag("-v,--verbose", verbose, "debug output");
  app.add_flag("-q,--quiet", quiet, "warnings and errors only");
  std::map<CLI::App*, zo2::cli::Runner> runners;
  auto reg = [&](const char* name, const char* help, zo2::cli::Runner (*add)(CLI::App&)) {
    CLI::App* sub = app.add_subcommand(name, help);
    runners[sub] = add(*sub);
  };
  reg("init", "write a random-initialized HF checkpoint of a preset shape", zo2::cli::add_init);
  reg("forward", "run a checkpoint on token ids; write logits and loss", zo2::cli::add_forward);
  reg("plan", "show the placement and byte budget under a device memory cap", zo2::cli::add_plan);
  reg("train", "fine-tune with MeZO steps, streaming blocks through the device window", zo2::cli::add_train);
  reg("eval", "mean loss of a checkpoint on a data file", zo2::cli::add_eval);
  reg("generate", "generate text from prompts through the streaming runtime (KV cache)", zo2::cli::add_generate);
  reg("replay", "rebuild tuned weights from a base checkpoint and a seed log", zo2::cli::add_replay);
  reg("merge", "fold a LoRA adapter into its base: a plain HF checkpoint", zo2::cli::add_merge);
  reg("synth-data", "write a synthetic, learnable token dataset (safetensors)", zo2::cli::add_synth_data);
  reg("tokenize", "print the token ids of a text as a JSON array", zo2::cli::add_tokenize);
  reg("data", "show what a data file becomes: format, sizes, and the first examples as the model sees them", zo2::cli::add_data);
  // --storage-dtype (DeviceFlags) shows no "=fp32" where fp32 is not always the default: an
  // adapter run's own dtype (eval, forward, generate), a resumed run's (train), the seed
  // log's (replay); its text says which. plan's default is fp32.
  for (CLI::App* sub : app.get_subcommands([](CLI::App*) { return true; }))
    if (CLI::Option* storage = sub->get_option_no_throw("--storage-dtype"); storage && sub->get_name() != "plan")
      storage->default_str("");
  zo2::cli::decimal_integer_options(app);  // Note [Decimal integers]
  zo2::cli::non_empty_values(app);  // after, so it runs first: Note [Empty values]
  try {
    app.parse(argc, argv);
  } catch (const CLI::ArgumentMismatch& e) {
    // A flag given twice: CLI11 says "--steps: At Most 1 required but received 2", which
    // reads as if the value 2 were wrong, and names the repeated flag rather than the value
    // the user just added (a script that appends `--batch-size 1000000000` to a command that
    // already has one sees "--batch-size: ... received 2"). Say what happened instead.
    if (const std::string repeated = repeated_flag(app); !repeated.empty()) {
      zo2::print_stderr("zo2-tune: error: {}\n", repeated);
      return 2;
    }
    return app.exit(e) == 0 ? 0 : 2;
  } catch (const CLI::ConversionError& e) {
    // A whole number past what the flag's type holds (--batch-size 3000000000: a 32-bit
    // field): CLI11 says only "Could not convert: --batch-size = 3000000000". Say the range.
    const std::string subject = conversion_subject(e.what());
    const auto space = subject.find(' ');
    const std::string flag = subject.substr(0, space);
    const std::string value = subject.substr(space == std::string::npos ? 0 : space + 1);
    const bool whole = !value.empty() && value.find_first_not_of("+-0123456789") == std::string::npos;
    const std::string range = whole ? whole_number_range(app, flag, value) : "";
    zo2::print_stderr("zo2-tune: error: {}: {}\n", subject,
                      !whole           ? std::string("not a number")
                      : range.empty() ? std::string("beyond what this flag can hold")
                                      : fmt::format("beyond what this flag can hold ({})", range));
    return 2;
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;  // --help and --version succeed; usage errors exit 2
  } catch (const zo2::Error& e) {
    zo2::print_stderr("zo2-tune: error: {}\n", e.what());
    return 2;
  }
  if (const std::string both = contradicting_flag(app); !both.empty()) {
    zo2::print_stderr("zo2-tune: error: {}\n", both);
    return 2;
  }
  zo2::log_set_level(verbose ? zo2::LogLevel::debug : quiet ? zo2::LogLevel::warn : zo2::LogLevel::info);
  const zo2::cli::HostThreadsScope host_threads;  // Note [zo2-tune's threads]
  try {
    for (auto& [sub, run] : runners) {
      if (!sub->parsed()) continue;
      // The subcommand's --threads (train sets it again once a resumed run's is known).
      const CLI::Option* threads = sub->get_option_no_throw("--threads");
      zo2::cli::cap_host_threads(threads && threads->count() > 0 ? threads->as<int>() : 0);
      // Only train runs as ranks; any other subcommand under mpirun would do its whole job
      // once per rank (the same files written N times, the output printed N times).
      if (sub->get_name() != "train" && zo2::launched_by_mpi())
        zo2::fail(zo2::ErrorKind::invalid_argument,
                  "{} runs as one process, but this one was started by an MPI launcher as one of {} ranks: run it "
                  "without mpirun (only train runs as ranks; plan --parallel shows a rank's plan from one process)",
                  sub->get_name(), zo2::launcher_world_size());
      return run();
    }
  } catch (const zo2::Error& e) {
    // (print_stderr never throws: a throw in a handler would end the process in std::terminate)
    zo2::print_stderr("zo2-tune: error: {}\n", e.what());
    return e.kind() == zo2::ErrorKind::invalid_argument ? 2 : 1;
  } catch (const std::exception& e) {
    zo2::print_stderr("zo2-tune: error: {}\n", zo2::cli::describe_error(e));
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  zo2::cli::open_standard_streams();  // Note [Standard streams]: before any file is opened
  const int rc = run_main(argc, argv);
  return zo2::cli::finish_stdout("zo2-tune", rc);
}
