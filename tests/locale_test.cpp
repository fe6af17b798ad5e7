// Numbers and units read and written the same under any locale a host program sets: zo2-tune
// runs under the C locale, but a C host or a Python program may call setlocale(LC_ALL, "")
// under a decimal comma (de_DE) or Turkish casing (tr_TR), and strtod, stod, snprintf and
// toupper follow it (adversarial pass 49).
#include <gtest/gtest.h>
#include <locale.h>
#include <sys/wait.h>
#include <unistd.h>

#include <clocale>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <string>

#include "runtime/arena.h"
#include "runtime/error.h"
#include "tests/test_util.h"
#include "tools/task_metrics.h"

namespace zo2 {
namespace {
namespace fs = std::filesystem;
using namespace cli::metrics;

// Makes `name` (de_DE.UTF-8, ...) with localedef into dir; false where the machine cannot.
bool make_locale(const fs::path& dir, const std::string& name) {
  if (!fs::exists("/usr/share/i18n/locales/" + name.substr(0, name.find('.')))) return false;
  const std::string cmd = "localedef -i " + name.substr(0, name.find('.')) + " -f UTF-8 '" + (dir / name).string() +
                          "' >/dev/null 2>&1";
  return std::system(cmd.c_str()) == 0 || fs::exists(dir / name / "LC_NUMERIC");
}

// fn's result in a child process whose whole locale is `name` (0 = as expected; 77 = the
// locale could not be set).
int in_locale(const fs::path& locpath, const std::string& name, const std::function<int()>& fn) {
  return test::in_child([&] {
    ::setenv("LOCPATH", locpath.c_str(), 1);
    return std::setlocale(LC_ALL, name.c_str()) ? fn() : 77;
  });
}

int check_sizes_and_drop() {
  constexpr std::size_t MiB = std::size_t{1} << 20;
  if (parse_byte_size("1.5G") != 1536 * MiB) return 1;
  if (parse_byte_size("512MiB") != 512 * MiB || parse_byte_size("64kib") != 64 * 1024) return 2;
  if (parse_byte_size(" 0.5 GiB") != 512 * MiB || parse_byte_size("1e3") != 1000) return 3;
  for (const char* bad : {"1,5G", "0x40M", "1.5 ĞiB"}) {
    try {
      parse_byte_size(bad);
      return 4;
    } catch (const Error&) {
    }
  }
  // DROP's numbers: "3.25" stays 3.25 (a decimal comma made it 3.0, and a wrong answer right).
  if (drop_normalize("3.25") != "3.25" || drop_normalize("the 3.5 km") != "3.5 km") return 5;
  if (drop_metrics("3.7", {"3.5"}).em != 0 || drop_metrics("about 12.5 percent", {"12.9 percent"}).f1 != 0) return 6;
  if (drop_metrics("red apples", {"red apples and pears"}).f1 != 0.67) return 7;  // round(x, 2)
  return 0;
}

TEST(Locale, SizesUnitsAndDropNumbersReadTheSameUnderEveryLocale) {
  test::TempDir tmp;
  EXPECT_EQ(check_sizes_and_drop(), 0) << "C locale";
  int made = 0;
  for (const std::string name : {"de_DE.UTF-8", "fr_FR.UTF-8", "tr_TR.UTF-8"}) {
    if (!make_locale(tmp.path(), name)) continue;
    ++made;
    EXPECT_EQ(in_locale(tmp.path(), name, check_sizes_and_drop), 0) << name;
  }
  if (made == 0) GTEST_SKIP() << "no locale could be made (localedef and Debian's locales package are needed)";
}

}  // namespace
}  // namespace zo2
