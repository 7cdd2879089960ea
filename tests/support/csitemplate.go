// csitemplate renders a ConnectorClass configuration template the way the
// Connectors CSI driver does (Go text/template with the sprig functions the
// upstream classes use), for tests/test_clientconfig.py.  Only the standard
// library: the few sprig functions are restated here with sprig's semantics.
//
// stdin: {"template": "...", "data": {...}}; stdout: the rendered text.
package main

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"strings"
	"text/template"
)

func urlParse(v string) map[string]interface{} {
	u, err := url.Parse(v)
	if err != nil {
		panic(err)
	}
	user := ""
	if u.User != nil {
		user = u.User.String()
	}
	return map[string]interface{}{
		"scheme": u.Scheme, "host": u.Host, "hostname": u.Hostname(), "path": u.Path,
		"query": u.RawQuery, "opaque": u.Opaque, "fragment": u.Fragment, "userinfo": user,
	}
}

func main() {
	var in struct {
		Template string                 `json:"template"`
		Data     map[string]interface{} `json:"data"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	funcs := template.FuncMap{
		"b64enc":     func(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) },
		"urlParse":   urlParse,
		"trimSuffix": func(suffix, s string) string { return strings.TrimSuffix(s, suffix) },
		"trimPrefix": func(prefix, s string) string { return strings.TrimPrefix(s, prefix) },
	}
	t, err := template.New("t").Funcs(funcs).Option("missingkey=error").Parse(in.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(3)
	}
	if err := t.Execute(os.Stdout, in.Data); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(4)
	}
}
