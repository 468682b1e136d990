// kmsctl card provision | split: write the startup secret, or Shamir shares of it, to operator
// cards (any PKCS#11 token; OpenSC for smart cards). Local operations: they talk to the cards,
// never to kmsd. The secret is read without echo or from a 0600 file and never printed.
#include <iostream>

#include "cli/commands/common.hpp"
#include "daemon/startup/operator_card.hpp"
#include "daemon/startup/quorum.hpp"
#include "daemon/startup/secret_source.hpp"

namespace kmsd::cli {

namespace {

// Below this length a secret split k-of-n could be guessed by whoever holds k-1 shares (the
// share digests let them test guesses; see daemon/startup/quorum.hpp).
constexpr std::size_t kShortSecret = 16;

struct CardTarget {
  std::string config;
  std::string module;
  std::string label;
};

// Fills module and label from --config's [startup] when the flags do not give them.
Status resolve_target(CardTarget& t) {
  if (!t.config.empty() && (t.module.empty() || t.label.empty())) {
    auto cfg = load_config(t.config);
    if (!cfg) return make_error(ErrorCode::kConfig, "cannot read " + t.config);
    if (t.module.empty()) t.module = cfg->startup.card_module.string();
    if (t.label.empty()) t.label = cfg->startup.card_label;
  }
  if (t.label.empty()) t.label = config::StartupConfig{}.card_label;
  if (t.module.empty())
    return make_error(ErrorCode::kInvalidArgument,
                      "name the cards' PKCS#11 module with --module PATH (or --config with "
                      "startup.card_module)");
  return {};
}

// The startup secret: from a 0600 file, or typed twice without echo.
Result<SecretBytes> new_secret(const std::string& file) {
  if (!file.empty()) return startup::read_secret_from_file(file);
  KMSD_ASSIGN_OR_RETURN(
      auto a, startup::read_secret_from_terminal("Startup secret (the key token's user PIN): "));
  KMSD_ASSIGN_OR_RETURN(auto b, startup::read_secret_from_terminal("Repeat the startup secret: "));
  if (!constant_time_equal(a.span(), b.span()))
    return make_error(ErrorCode::kInvalidArgument, "the two entries differ; nothing was written");
  return a;
}

Result<SecretBytes> card_pin(const std::vector<std::string>& files, std::size_t i,
                             const std::string& what) {
  if (i < files.size()) return startup::read_secret_from_file(files[i]);
  if (!files.empty())
    return make_error(ErrorCode::kInvalidArgument,
                      "--pin-files lists " + std::to_string(files.size()) +
                          " files; give one per card, in the order of the cards");
  return startup::read_secret_from_terminal("Insert " + what + " and type its PIN: ");
}

// ---- provision ----

struct ProvisionArgs {
  CardTarget target;
  std::string card;
  std::string secret_file;
  std::string pin_file;
  bool force = false;
};

int run_provision(ProvisionArgs a) {
  if (auto st = resolve_target(a.target); !st.ok()) return fail(st.error());
  auto secret = new_secret(a.secret_file);
  if (!secret.ok()) return fail(secret.error());
  auto pin = card_pin(
      a.pin_file.empty() ? std::vector<std::string>{} : std::vector<std::string>{a.pin_file}, 0,
      "the operator card " + a.card);
  if (!pin.ok()) return fail(pin.error());
  startup::CardReport report;
  auto st = startup::write_card_object({a.target.module, a.card}, *pin, a.target.label, *secret,
                                       a.force, &report);
  if (!st.ok()) return fail(st.error());
  std::cout << "The startup secret is on operator card '" << report.label << "' (serial "
            << report.serial << ") as the private data object '" << a.target.label << "'.\n"
            << "kmsd reads it with startup.source = \"card\" and card_uri naming this card.\n";
  return kOk;
}

// ---- split ----

struct SplitArgs {
  CardTarget target;
  unsigned k = 0;
  std::vector<std::string> cards;
  std::vector<std::string> pin_files;
  std::string secret_file;
  std::vector<std::string> from_cards;
  std::vector<std::string> from_pin_files;
  bool force = false;
};

// The current secret read from the old cards: a quorum's shares (k of them) or one card
// holding the whole secret.
Result<SecretBytes> secret_from_cards(const SplitArgs& a) {
  startup::ShareCollector shares(std::chrono::hours(24));
  for (std::size_t i = 0; i < a.from_cards.size(); ++i) {
    const std::string& uri = a.from_cards[i];
    KMSD_ASSIGN_OR_RETURN(auto pin, card_pin(a.from_pin_files, i, "the current card " + uri));
    KMSD_ASSIGN_OR_RETURN(auto value,
                          startup::read_card_object({a.target.module, uri}, pin, a.target.label));
    auto parsed = startup::parse_share(value.span());
    if (!parsed.ok()) {
      if (a.from_cards.size() == 1) return value;  // a card holding the whole secret
      return parsed.error().context(uri);
    }
    KMSD_ASSIGN_OR_RETURN(auto progress, shares.add(value.span()));
    std::cerr << "read " << uri << ": " << progress.text() << "\n";
    if (progress.complete()) return shares.take_secret();
  }
  auto p = shares.progress();
  return make_error(ErrorCode::kInvalidArgument, "the current cards gave " +
                                                     (p ? p->text() : std::string("no shares")) +
                                                     "; name at least k of them with --from-cards");
}

int run_split(SplitArgs a) {
  if (auto st = resolve_target(a.target); !st.ok()) return fail(st.error());
  const auto n = static_cast<unsigned>(a.cards.size());
  if (a.k < 2 || a.k > n || n > 255)
    return fail(make_error(
        ErrorCode::kInvalidArgument,
        "a quorum needs 2 <= --quorum-k <= number of --cards (" + std::to_string(n) + ") <= 255"));
  if (!a.pin_files.empty() && a.pin_files.size() != n)
    return fail(make_error(ErrorCode::kInvalidArgument,
                           "--pin-files needs one file per card, in the order of --cards"));
  Result<SecretBytes> secret =
      a.from_cards.empty() ? new_secret(a.secret_file) : secret_from_cards(a);
  if (!secret.ok()) return fail(secret.error());
  if (secret->size() < kShortSecret)
    std::cerr << "kmsctl: warning: the startup secret is " << secret->size()
              << " bytes; with a quorum, whoever holds k-1 cards could test guesses of a short "
                 "secret. Give the key token a long random user PIN (16 characters or more).\n";
  auto shares = startup::split_secret(*secret, a.k, n);
  if (!shares.ok()) return fail(shares.error());
  const std::string id = shares->front().quorum_id_hex();
  std::vector<startup::ForbiddenToken> written;
  for (unsigned i = 0; i < n; ++i) {
    const std::string what = "operator card " + std::to_string(i + 1) + " of " + std::to_string(n) +
                             " (" + a.cards[i] + ")";
    auto pin = card_pin(a.pin_files, i, what);
    if (!pin.ok()) return fail(pin.error());
    startup::CardReport report;
    auto blob = startup::encode_share((*shares)[i]);
    auto st = startup::write_card_object({a.target.module, a.cards[i]}, *pin, a.target.label, blob,
                                         a.force, &report, written);
    if (!st.ok()) {
      std::cerr << "kmsctl: " << what << ": " << st.error().message << "\n";
      if (i > 0)
        std::cerr << "kmsctl: cards 1.." << i << " already hold shares of the new quorum "
                  << id.substr(0, 8) << ", which is incomplete and unusable; run the split "
                  << "again (with --force) once every card is at hand\n";
      return exit_for(st.error());
    }
    written.push_back({report.label, report.serial});
    std::cout << "share " << (i + 1) << " of " << n << " written to card '" << report.label
              << "' (serial " << report.serial << ")\n";
  }
  std::cout << "Quorum " << id << ": any " << a.k << " of these " << n
            << " cards rebuild the startup secret.\n"
            << "kmsd reads them with startup.source = \"quorum\"; operators present their cards "
               "one at a time with `kmsctl unseal --card URI`.\n";
  return kOk;
}

void add_target_options(CLI::App* cmd, CardTarget& t) {
  cmd->add_option("--module", t.module,
                  "PKCS#11 module of the cards (default: startup.card_module of --config)");
  cmd->add_option("--label", t.label,
                  "label of the data object on the cards (default: startup.card_label, else "
                  "kms-startup-secret)");
  cmd->add_option("-c,--config", t.config, "kmsd configuration file, for the defaults above");
}

}  // namespace

void add_card_commands(CLI::App& app, Commands& commands) {
  auto* card = app.add_subcommand("card", "write the startup secret to operator cards");
  card->require_subcommand(1);

  auto* prov = card->add_subcommand(
      "provision", "write the startup secret to one operator card (startup.source = \"card\")");
  auto& p = commands.add<ProvisionArgs>(prov, run_provision);
  prov->add_option("--card", p.card, "the card, as a pkcs11: URI (token=, serial=, ...)")
      ->required();
  add_target_options(prov, p.target);
  prov->add_option("--secret-file", p.secret_file,
                   "0600 file holding the startup secret (default: prompt twice, no echo)");
  prov->add_option("--pin-file", p.pin_file,
                   "0600 file holding the card's PIN (default: prompt, no echo)");
  prov->add_flag("--force", p.force, "replace a secret already on the card");

  auto* split = card->add_subcommand(
      "split",
      "split the startup secret k-of-n, one share per operator card (startup.source = "
      "\"quorum\"); also re-splits to a new set of cards");
  auto& s = commands.add<SplitArgs>(split, run_split);
  split->add_option("--quorum-k,-k", s.k, "shares needed to unseal (2..number of cards)")
      ->required();
  split
      ->add_option("--cards", s.cards,
                   "the new cards, one pkcs11: URI each (repeat one URI to swap cards in a "
                   "single reader)")
      ->required();
  add_target_options(split, s.target);
  split->add_option("--pin-files", s.pin_files,
                    "0600 files holding each new card's PIN, in the order of --cards (default: "
                    "prompt per card)");
  auto* sf = split->add_option("--secret-file", s.secret_file,
                               "0600 file holding the startup secret (default: prompt twice)");
  split
      ->add_option("--from-cards", s.from_cards,
                   "read the current secret from these cards instead: k cards of the old "
                   "quorum, or the one card holding it")
      ->excludes(sf);
  split->add_option("--from-pin-files", s.from_pin_files,
                    "0600 files holding the PINs of --from-cards, in order (default: prompt)");
  split->add_flag("--force", s.force, "replace secrets or shares already on the new cards");
}

}  // namespace kmsd::cli
